// Package envconfig reads a binary's settings from its environment and
// remembers which variables it asked for, so a test can hold each binary to
// the operator's contract: every variable the operator sets is read, and
// every variable read is either set by the operator or optional.
package envconfig

import (
	"os"
	"sort"
	"sync"
)

// Env is an environment being read.
type Env struct {
	lookup func(string) (string, bool)
	mu     sync.Mutex
	read   map[string]bool
}

// New reads from lookup; nil means the process environment.
func New(lookup func(string) (string, bool)) *Env {
	if lookup == nil {
		lookup = os.LookupEnv
	}
	return &Env{lookup: lookup, read: map[string]bool{}}
}

// FromMap reads from m (tests).
func FromMap(m map[string]string) *Env {
	return New(func(k string) (string, bool) { v, ok := m[k]; return v, ok })
}

// Get returns the value of name, or def when it is unset or empty.
func (e *Env) Get(name, def string) string {
	e.mu.Lock()
	e.read[name] = true
	e.mu.Unlock()
	if v, ok := e.lookup(name); ok && v != "" {
		return v
	}
	return def
}

// Read lists the variables asked for so far, sorted.
func (e *Env) Read() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make([]string, 0, len(e.read))
	for k := range e.read {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
