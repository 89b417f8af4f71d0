package handover

import (
	"errors"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ambientmesh/ambient/proxylib/identity"
)

var (
	peerID  = identity.Identity{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "client"}
	otherID = identity.Identity{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "mallory"}
)

type closer struct{ closed atomic.Int32 }

func (c *closer) Close() error { c.closed.Add(1); return nil }

// parkedSession registers testID with peerID, parked at epoch 0 having sent
// 100 and received 40 bytes.
func parkedSession(t *testing.T, ttl time.Duration) (*Registry, *Entry, *closer) {
	r := NewRegistry(ttl)
	e, ok := r.Add(testID, peerID, 0, nil)
	if !ok {
		t.Fatal("Add refused a fresh id")
	}
	sock := &closer{}
	r.Park(e, 100, 40, sock)
	return r, e, sock
}

func TestClaimRefusals(t *testing.T) {
	other := testID
	other[0] ^= 0xff
	for _, tc := range []struct {
		name   string
		p      Params
		caller identity.Identity
		want   error
		status int
	}{
		{"wrong peer identity", Params{ID: testID, Sent: 40, Recv: 100}, otherID, ErrWrongPeer, http.StatusForbidden},
		{"forged session id", Params{ID: other, Sent: 40, Recv: 100}, peerID, ErrUnknown, http.StatusNotFound},
		{"sent does not match what we received", Params{ID: testID, Sent: 41, Recv: 100}, peerID, ErrOffsets, http.StatusConflict},
		{"recv does not match what we sent", Params{ID: testID, Sent: 40, Recv: 99}, peerID, ErrOffsets, http.StatusConflict},
		{"future epoch", Params{ID: testID, Epoch: 1, Sent: 40, Recv: 100}, peerID, ErrNotParked, http.StatusConflict},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, _, sock := parkedSession(t, time.Minute)
			if _, _, err := r.Claim(tc.p, tc.caller); !errors.Is(err, tc.want) {
				t.Fatalf("Claim = %v, want %v", err, tc.want)
			}
			if got := Status(tc.want); got != tc.status {
				t.Fatalf("Status = %d, want %d", got, tc.status)
			}
			// A refusal leaves the parked socket for the real resume.
			if sock.closed.Load() != 0 {
				t.Fatal("a refused resume closed the parked socket")
			}
			if _, got, err := r.Claim(Params{ID: testID, Sent: 40, Recv: 100}, peerID); err != nil || got != sock {
				t.Fatalf("the genuine resume after a refusal: %v", err)
			}
		})
	}
}

func TestClaimOnceThenReplayRefused(t *testing.T) {
	r, e, sock := parkedSession(t, time.Minute)
	p := Params{ID: testID, Sent: 40, Recv: 100}
	got, s, err := r.Claim(p, peerID)
	if err != nil || got != e || s != sock {
		t.Fatalf("Claim = %v, %v, %v", got, s, err)
	}
	if r.Epoch(e) != 1 {
		t.Fatalf("epoch after resume = %d, want 1", r.Epoch(e))
	}
	if _, _, err := r.Claim(p, peerID); !errors.Is(err, ErrReplayed) {
		t.Fatalf("replayed resume: %v, want ErrReplayed", err)
	}
	// The resumed session can be suspended again, at the next epoch only.
	if _, err := r.Find(testID, peerID, 0); !errors.Is(err, ErrReplayed) {
		t.Fatalf("suspend at the old epoch: %v", err)
	}
	if _, err := r.Find(testID, peerID, 1); err != nil {
		t.Fatalf("suspend at the new epoch: %v", err)
	}
	// Ended sessions stay refused.
	r.Remove(e)
	if _, _, err := r.Claim(Params{ID: testID, Epoch: 1}, peerID); !errors.Is(err, ErrUnknown) {
		t.Fatalf("resume of an ended session: %v", err)
	}
}

func TestParkedSessionExpires(t *testing.T) {
	r, _, sock := parkedSession(t, 50*time.Millisecond)
	deadline := time.Now().Add(10 * time.Second)
	for sock.closed.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("parked socket not closed after its TTL")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if _, _, err := r.Claim(Params{ID: testID, Sent: 40, Recv: 100}, peerID); !errors.Is(err, ErrExpired) {
		t.Fatalf("resume after expiry: %v, want ErrExpired", err)
	}
	if r.Len() != 0 {
		t.Fatalf("%d sessions held after expiry", r.Len())
	}
}

func TestSuspendLookup(t *testing.T) {
	r := NewRegistry(time.Minute)
	e, _ := r.Add(testID, peerID, 0, "relay")
	if got, err := r.Find(testID, peerID, 0); err != nil || got.Value != "relay" {
		t.Fatalf("Find = %v, %v", got, err)
	}
	if _, err := r.Find(testID, otherID, 0); !errors.Is(err, ErrWrongPeer) {
		t.Fatalf("suspend from another identity: %v", err)
	}
	r.Park(e, 1, 1, &closer{})
	if _, err := r.Find(testID, peerID, 0); !errors.Is(err, ErrNotParked) {
		t.Fatalf("suspend of a parked session: %v", err)
	}
	if _, _, err := r.Claim(Params{ID: testID}, peerID); err == nil {
		t.Fatal("resume with wrong offsets accepted")
	}
}
