// Package lab_test checks the lab script's own guards, without bringing a lab up.
package lab_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestLabRefusesAnotherCheckoutsLab: the lab's names are machine-wide, so a
// checkout must neither come up over another checkout's lab (it would reuse
// that lab's node mount namespaces without its own node directories, and fail
// obscurely half way) nor tear it down.
func TestLabRefusesAnotherCheckoutsLab(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("the lab script needs root")
		}
		t.Skip("the lab script needs root")
	}
	cases := []struct {
		name, cmd string
		prepare   func(t *testing.T, run string)
		want      string
	}{
		{"up over an owned lab", "up", ownedBy("/elsewhere"), "a lab from /elsewhere is up on this machine"},
		{"down of an owned lab", "down", ownedBy("/elsewhere"), "the lab on this machine is /elsewhere's"},
		{"up over a lab without owner", "up", nodeMountNamespace, "a lab not started from this checkout is up"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			lab, run := t.TempDir(), t.TempDir()
			tc.prepare(t, run)
			cmd := exec.Command("./lab.sh", tc.cmd)
			cmd.Env = append(os.Environ(), "LAB_DIR="+lab, "LAB_RUN="+run)
			out, err := cmd.CombinedOutput()
			if err == nil {
				t.Fatalf("lab.sh %s went on; output:\n%s", tc.cmd, out)
			}
			if !strings.Contains(string(out), tc.want) {
				t.Fatalf("lab.sh %s: want %q in the output, got:\n%s", tc.cmd, tc.want, out)
			}
			if entries, _ := os.ReadDir(lab); len(entries) != 0 {
				t.Fatalf("lab.sh %s wrote into the lab directory before refusing: %v", tc.cmd, entries)
			}
		})
	}
}

func ownedBy(root string) func(*testing.T, string) {
	return func(t *testing.T, run string) {
		if err := os.WriteFile(filepath.Join(run, "owner"), []byte(root+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// nodeMountNamespace leaves what a lab of an older script (no owner file)
// leaves: a node's mount namespace handle.
func nodeMountNamespace(t *testing.T, run string) {
	if err := os.MkdirAll(filepath.Join(run, "ns"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(run, "ns", "w1.mnt"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
}
