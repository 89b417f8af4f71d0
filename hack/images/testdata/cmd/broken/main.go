package main

// Does not compile: stands in for a cmd broken by a change.
func main() { undefined() }
