package discovery

import "testing"

func TestLeading(t *testing.T) {
	closed := make(chan struct{})
	close(closed)
	tests := []struct {
		name    string
		elected <-chan struct{}
		want    bool
	}{
		{"no election", nil, true},
		{"follower", make(chan struct{}), false},
		{"leader", closed, true},
	}
	for _, tc := range tests {
		c := NewController(nil, Options{Elected: tc.elected})
		if got := c.leading(); got != tc.want {
			t.Errorf("%s: leading %v, want %v", tc.name, got, tc.want)
		}
	}
}
