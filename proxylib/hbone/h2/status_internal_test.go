package h2

import "testing"

// TestParseStatus: a CONNECT response's :status is three digits or it is
// malformed (0), never a lenient prefix parse.
func TestParseStatus(t *testing.T) {
	for in, want := range map[string]int{
		"200": 200, "100": 100, "403": 403, "503": 503, "000": 0,
		"": 0, "20": 0, "2000": 0, "200abc": 0, "20a": 0, "-20": 0, " 200": 0, "２00": 0,
	} {
		if got := parseStatus(in); got != want {
			t.Errorf("parseStatus(%q) = %d, want %d", in, got, want)
		}
	}
}
