package main

import (
	"testing"

	"github.com/ambientmesh/ambient/proxylib/logging/loggingtest"
)

// TestEveryAPILogLevelIsAccepted: every logLevel the CRDs admit starts
// this binary's logger (an unknown one would make the pod crash-loop).
func TestEveryAPILogLevelIsAccepted(t *testing.T) {
	levels := loggingtest.APILevels(t)
	for _, l := range levels {
		if _, _, err := newLogger(l); err != nil {
			t.Errorf("log level %q: %v", l, err)
		}
	}
	t.Logf("checked %v", levels)
}
