package logging

import (
	"testing"

	"github.com/go-logr/zapr"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

func TestParseLevel(t *testing.T) {
	for _, c := range []struct {
		name string
		want zapcore.Level
		ok   bool
	}{
		{"trace", Trace, true}, {"debug", zapcore.DebugLevel, true}, {"info", zapcore.InfoLevel, true},
		{"warn", zapcore.WarnLevel, true}, {"error", zapcore.ErrorLevel, true},
		{"", zapcore.InfoLevel, true}, // zap's default, as an unset LOG_LEVEL
		{"verbose", 0, false}, {"TRACE!", 0, false},
	} {
		got, err := ParseLevel(c.name)
		if (err == nil) != c.ok || (c.ok && got != c.want) {
			t.Errorf("ParseLevel(%q) = %v, %v; want %v (ok=%v)", c.name, got, err, c.want, c.ok)
		}
	}
}

// TestTraceEnablesV2: "trace" shows logr V(2) lines, "debug" only V(1).
func TestTraceEnablesV2(t *testing.T) {
	for _, c := range []struct {
		level string
		want  int
	}{{"trace", 3}, {"debug", 2}, {"info", 1}} {
		lvl, err := NewAtomicLevel(c.level)
		if err != nil {
			t.Fatal(err)
		}
		core, logs := observer.New(lvl)
		log := zapr.NewLogger(zap.New(core))
		log.Info("v0")
		log.V(1).Info("v1")
		log.V(2).Info("v2")
		if n := logs.Len(); n != c.want {
			t.Errorf("%s: %d lines, want %d", c.level, n, c.want)
		}
	}
}

func TestSetLevelKeepsLevelOnError(t *testing.T) {
	lvl := zap.NewAtomicLevelAt(zapcore.WarnLevel)
	if err := SetLevel(lvl, "nonsense"); err == nil {
		t.Fatal("nonsense accepted")
	}
	if lvl.Level() != zapcore.WarnLevel {
		t.Fatalf("level changed to %v", lvl.Level())
	}
	if err := SetLevel(lvl, "trace"); err != nil || lvl.Level() != Trace {
		t.Fatalf("trace: %v, %v", lvl.Level(), err)
	}
}
