package identity

import (
	"errors"
	"testing"
)

func TestParse(t *testing.T) {
	tests := []struct {
		in      string
		want    Identity
		wantErr error
	}{
		{"spiffe://cluster.local/ns/default/sa/sleep", Identity{"cluster.local", "default", "sleep"}, nil},
		{"spiffe://td/ns/a-b/sa/c.d", Identity{"td", "a-b", "c.d"}, nil},
		{"http://cluster.local/ns/default/sa/sleep", Identity{}, ErrNotSPIFFE},
		{"spiffe://Cluster.local/ns/default/sa/sleep", Identity{}, ErrBadTrustDomain},
		{"spiffe://cluster.local:80/ns/default/sa/sleep", Identity{}, ErrBadTrustDomain},
		{"spiffe://user@cluster.local/ns/default/sa/sleep", Identity{}, ErrBadTrustDomain},
		{"spiffe:///ns/default/sa/sleep", Identity{}, ErrBadTrustDomain},
		{"spiffe://cluster.local", Identity{}, ErrBadPath},
		{"spiffe://cluster.local/ns/default", Identity{}, ErrBadPath},
		{"spiffe://cluster.local/ns/default/sa/", Identity{}, ErrBadPath},
		{"spiffe://cluster.local/ns//sa/sleep", Identity{}, ErrBadPath},
		{"spiffe://cluster.local/ns/default/sa/sleep/", Identity{}, ErrBadPath},
		{"spiffe://cluster.local/ns/default/sa/sleep?x=1", Identity{}, ErrBadPath},
		{"spiffe://cluster.local/ns/default/sa/sleep#f", Identity{}, ErrBadPath},
		{"spiffe://cluster.local/ns/../sa/sleep", Identity{}, ErrBadPath},
		{"spiffe://cluster.local/sa/sleep/ns/default", Identity{}, ErrBadPath},
		{"spiffe://cluster.local/ns/Default/sa/sleep", Identity{}, ErrBadPath},
		{"spiffe://cluster.local/ns/-a/sa/sleep", Identity{}, ErrBadPath},
		{"spiffe://cluster.local/ns/a%2f/sa/sleep", Identity{}, ErrBadPath},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := Parse(tt.in)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("Parse(%q) error = %v, want %v", tt.in, err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("Parse(%q) = %v, %v; want %v", tt.in, got, err, tt.want)
			}
			if got.String() != tt.in {
				t.Fatalf("round trip: %q != %q", got.String(), tt.in)
			}
		})
	}
}

func TestPrincipal(t *testing.T) {
	id := MustParse("spiffe://cluster.local/ns/ambient-demo/sa/sleep")
	if got, want := id.Principal(), "cluster.local/ns/ambient-demo/sa/sleep"; got != want {
		t.Fatalf("Principal() = %q, want %q", got, want)
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"spiffe://cluster.local/ns/default/sa/sleep", "spiffe://td/ns/a/sa/b/c", "spiffe://", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, err := Parse(s)
		if err != nil {
			return
		}
		// Anything accepted must round-trip exactly and re-parse to itself.
		if id.String() != s {
			t.Fatalf("accepted %q but formats as %q", s, id.String())
		}
		if again, err := Parse(id.String()); err != nil || again != id {
			t.Fatalf("re-parse of %q: %v %v", s, again, err)
		}
	})
}
