package main

import (
	"bytes"
	"strings"
	"testing"
)

// cobraOutput parses args as main does and returns what cobra printed.
func cobraOutput(t *testing.T, args ...string) string {
	t.Helper()
	var b bytes.Buffer
	inv, err := parseArgsTo(args, &b)
	if err != nil {
		t.Fatalf("%q: %v", args, err)
	}
	if inv.cmd != "help" {
		t.Fatalf("%q: cmd %q, want help (nothing left to run)", args, inv.cmd)
	}
	return b.String()
}

func TestCompletionScripts(t *testing.T) {
	for shell, want := range map[string]string{
		"bash":       "complete -o default -F __start_ambientctl ambientctl",
		"zsh":        "#compdef ambientctl",
		"fish":       "complete -c ambientctl",
		"powershell": "Register-ArgumentCompleter",
	} {
		if out := cobraOutput(t, "completion", shell); !strings.Contains(out, want) {
			t.Errorf("completion %s: no %q in\n%.300s", shell, want, out)
		}
	}
}

// The scripts ask the binary (__complete) for words: commands, their
// aliases' targets, waypoint verbs, proxy-config sections and flag values.
func TestDynamicCompletion(t *testing.T) {
	tests := []struct {
		args []string
		want []string
	}{
		{[]string{""}, []string{"proxy-config", "waypoint", "gateway", "precheck", "status", "dashboard", "version", "completion"}},
		{[]string{"waypoint", ""}, []string{"generate", "apply", "list", "status", "delete"}},
		{[]string{"zc", ""}, proxyConfigSectionNames},
		{[]string{"status", "-o", ""}, []string{"table", "json", "yaml"}},
		{[]string{"wp", "apply", "--for", ""}, []string{"service", "workload", "all", "none"}},
	}
	for _, tt := range tests {
		out := cobraOutput(t, append([]string{"__complete"}, tt.args...)...)
		words := map[string]bool{}
		for _, l := range strings.Split(out, "\n") {
			w, _, _ := strings.Cut(l, "\t")
			words[w] = true
		}
		for _, w := range tt.want {
			if !words[w] {
				t.Errorf("__complete %q: no %q in\n%s", tt.args, w, out)
			}
		}
	}
}
