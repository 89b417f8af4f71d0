// Package logging holds the one log-level vocabulary of every binary: the
// AmbientMesh API's names (error, warn, info, debug, trace) on top of zap's.
// Every main parses LOG_LEVEL / -log-level and the admin /logging endpoint
// through it, so a level the API accepts can never make a proxy exit.
package logging

import (
	"fmt"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Trace is the most verbose level: logr V(2) lines and above. zap has no
// name for it; logr's V(n) is zap level -n.
const Trace = zapcore.Level(-2)

// ParseLevel returns the zap level for name: "trace" or any zap level name
// (debug, info, warn, error, dpanic, panic, fatal).
func ParseLevel(name string) (zapcore.Level, error) {
	if name == "trace" {
		return Trace, nil
	}
	var l zapcore.Level
	if err := l.UnmarshalText([]byte(name)); err != nil {
		return 0, fmt.Errorf("log level %q: want trace, debug, info, warn or error", name)
	}
	return l, nil
}

// SetLevel changes level to name; level is unchanged on error.
func SetLevel(level zap.AtomicLevel, name string) error {
	l, err := ParseLevel(name)
	if err != nil {
		return err
	}
	level.SetLevel(l)
	return nil
}

// NewAtomicLevel is a zap.AtomicLevel set to name.
func NewAtomicLevel(name string) (zap.AtomicLevel, error) {
	l, err := ParseLevel(name)
	if err != nil {
		return zap.AtomicLevel{}, err
	}
	return zap.NewAtomicLevelAt(l), nil
}
