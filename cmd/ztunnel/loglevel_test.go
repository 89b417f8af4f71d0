package main

import (
	"testing"

	"github.com/ambientmesh/ambient/proxylib/logging/loggingtest"
)

// TestEveryAPILogLevelIsAccepted: every logLevel the CRDs admit starts
// this binary's logger.
func TestEveryAPILogLevelIsAccepted(t *testing.T) {
	loggingtest.AcceptsAPILevels(t, func(l string) error { _, _, err := newLogger(l); return err })
}
