package ztunnel

import (
	"crypto/x509"
	"encoding/json"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ambientmesh/ambient/proxylib/ca"
	"github.com/ambientmesh/ambient/proxylib/hbone/hbonetest"
	"github.com/ambientmesh/ambient/test/meshtest"
)

// TestProcessRootRotation: two real ztunnel processes follow a root
// rotation through their mounted trust bundle file alone (what the kubelet
// updates): the overlap bundle makes them re-issue, the CA then signs from
// the new chain and the reordered bundle makes them re-issue from it, and
// requests from sleep to httpbin keep succeeding throughout.
func TestProcessRootRotation(t *testing.T) {
	pm := newProcessMesh(t)
	waitUntil(t, func() bool { return pm.zts[0].ready() && pm.zts[1].ready() }, "both ztunnels ready")
	meshtest.ExpectOK(t, pm.sleep, pm.httpbin.Addr(80), "httpbin-1")

	var sent, failed atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			got, err := pm.sleep.Get(pm.httpbin.Addr(80))
			sent.Add(1)
			if err != nil || got != "httpbin-1" {
				failed.Add(1)
				t.Logf("request failed: %q %v", got, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()
	// Registered after the processes' cleanups, so it runs first: a failing
	// test stops its requests before the ztunnels are killed.
	stopTraffic := sync.OnceFunc(func() { close(stop); wg.Wait() })
	t.Cleanup(stopTraffic)

	next := hbonetest.NewCA(t, pm.CA.TrustDomain)
	writeBundle(t, pm.cp.roots, pm.CA.Root, next.Root) // Overlapping
	reissued(t, pm, 1)
	pm.cp.mu.Lock()
	pm.cp.signer = next // Reissuing: the new chain signs
	pm.cp.mu.Unlock()
	writeBundle(t, pm.cp.roots, next.Root, pm.CA.Root)
	reissued(t, pm, 2)
	for i, z := range pm.zts {
		deadline := time.Now().Add(30 * time.Second)
		for !holdsNewChain(t, pm.cp, z) {
			if time.Now().After(deadline) {
				stopTraffic()
				t.Fatalf("ztunnel %d holds no certificate from the new chain:\n%s", i, z.get(t, "127.0.0.1:15000", "/config_dump"))
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	time.Sleep(time.Second) // requests on new-chain certificates both ways
	stopTraffic()
	t.Logf("root rotation through two ztunnel processes: %d requests, %d failed", sent.Load(), failed.Load())
	if failed.Load() > 0 || sent.Load() == 0 {
		t.Fatalf("%d of %d requests failed during the rotation", failed.Load(), sent.Load())
	}
}

func writeBundle(t *testing.T, path string, roots ...*x509.Certificate) {
	t.Helper()
	tmp := path + ".new"
	if err := os.WriteFile(tmp, ca.EncodeCerts(roots...), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil { // whole, as the kubelet's symlink swap
		t.Fatal(err)
	}
}

// reissued waits until every ztunnel logged n bundle-driven re-issues of
// the sleep or httpbin certificate (the bundle is re-read every 10 s).
func reissued(t *testing.T, pm *processMesh, n int) {
	t.Helper()
	for i, z := range pm.zts {
		deadline := time.Now().Add(40 * time.Second)
		for strings.Count(z.out.String(), "trust bundle changed; re-issuing the certificate") < n {
			if time.Now().After(deadline) {
				t.Fatalf("ztunnel %d: %d bundle-driven re-issues logged, want %d", i, strings.Count(z.out.String(), "trust bundle changed; re-issuing the certificate"), n)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}

// holdsNewChain: the workload certificate z serves (config_dump) is one the
// new chain issued.
func holdsNewChain(t *testing.T, cp *xdsControlPlane, z *ztunnelProcess) bool {
	var dump struct {
		Certificates []struct{ Type, Serial string }
	}
	if err := json.Unmarshal([]byte(z.get(t, "127.0.0.1:15000", "/config_dump")), &dump); err != nil {
		t.Fatal(err)
	}
	cp.mu.Lock()
	defer cp.mu.Unlock()
	for _, c := range dump.Certificates {
		if c.Type == "Cert Chain" {
			return cp.bySigner[c.Serial]
		}
	}
	return false
}
