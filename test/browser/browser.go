// Package browser drives a real headless Chromium (the Debian package) for
// tests of web pages: the DOM after the page's scripts ran, and screenshots.
package browser

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// Chromium is a headless Chromium binary.
type Chromium struct {
	Path string
	// profile is a throwaway user data directory per test.
	profile string
}

// Find returns Chromium, skipping the test when it is not installed (failing
// in CI, where a skipped test hides a missing dependency).
func Find(t testing.TB) *Chromium {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return &Chromium{Path: p, profile: t.TempDir()}
		}
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("chromium is not installed (apt-get install -y chromium)")
	}
	t.Skip("chromium is not installed (apt-get install -y chromium)")
	return nil
}

// run runs Chromium headless with virtual time: the page's timers and
// fetches run until budget of virtual time has passed (or the page is
// idle), then Chromium acts (dump or screenshot) and exits.
func (c *Chromium) run(ctx context.Context, budget time.Duration, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	base := []string{
		"--headless", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
		"--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
		"--user-data-dir=" + c.profile,
		fmt.Sprintf("--virtual-time-budget=%d", budget.Milliseconds()),
	}
	if os.Geteuid() == 0 {
		base = append(base, "--no-sandbox") // Chromium refuses root with its sandbox
	}
	cmd := exec.CommandContext(ctx, c.Path, append(base, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("chromium %v: %v\n%s", args, err, tail(stderr.Bytes(), 2000))
	}
	return stdout.Bytes(), nil
}

// DOM loads url and returns the serialized DOM after budget of virtual time.
func (c *Chromium) DOM(ctx context.Context, url string, budget time.Duration) (string, error) {
	out, err := c.run(ctx, budget, "--dump-dom", url)
	return string(out), err
}

// Screenshot loads url and writes a PNG of width×height to path.
func (c *Chromium) Screenshot(ctx context.Context, url, path string, width, height int, budget time.Duration) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return err
	}
	if _, err := c.run(ctx, budget, "--screenshot="+abs, fmt.Sprintf("--window-size=%d,%d", width, height), url); err != nil {
		return err
	}
	st, err := os.Stat(abs)
	if err != nil {
		return fmt.Errorf("chromium wrote no screenshot: %w", err)
	}
	if st.Size() == 0 {
		return fmt.Errorf("chromium wrote an empty screenshot %s", abs)
	}
	return nil
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}
