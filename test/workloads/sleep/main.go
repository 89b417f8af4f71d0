// Command sleep is the lab's client image: one static binary that acts as
// `sleep`, `curl` (the subset the seeds' journey uses, with curl's exit codes),
// `connhold` (holds TCP connections open and counts the ones that break) and
// `dig` (resolves a name as a stub resolver, printing the response code),
// chosen by the name it is run as or by its first argument.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

func main() {
	name, args := filepath.Base(os.Args[0]), os.Args[1:]
	if name == "toolbox" && len(args) > 0 {
		name, args = args[0], args[1:]
	}
	switch name {
	case "sleep":
		os.Exit(sleepCmd(args))
	case "curl":
		os.Exit(curlMain(args, os.Stdout, os.Stderr))
	case "connhold":
		os.Exit(connholdMain(args, os.Stdout, os.Stderr))
	case "dig":
		os.Exit(digMain(args, os.Stdout, os.Stderr))
	default:
		fmt.Fprintf(os.Stderr, "toolbox: unknown command %q (sleep, curl, connhold, dig)\n", name)
		os.Exit(2)
	}
}

// sleepCmd sleeps for the given seconds, or forever for "infinity", and
// exits at once on SIGTERM so pod deletion is quick.
func sleepCmd(args []string) int {
	d := time.Duration(1<<63 - 1)
	if len(args) > 0 && args[0] != "infinity" {
		secs, err := strconv.ParseFloat(args[0], 64)
		if err != nil || secs < 0 {
			fmt.Fprintf(os.Stderr, "sleep: invalid time interval %q\n", args[0])
			return 1
		}
		d = time.Duration(secs * float64(time.Second))
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-time.After(d):
	case <-sigs:
	}
	return 0
}
