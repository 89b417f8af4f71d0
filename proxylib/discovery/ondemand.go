package discovery

import (
	"context"
	"sync"

	"github.com/ambientmesh/ambient/proxylib/discovery/xdsapi"
)

// sender serializes sends on one stream: the session's ACKs and Demand's
// subscriptions come from different goroutines.
type sender struct {
	mu     sync.Mutex
	stream *xdsapi.DeltaStream
}

func (s *sender) send(req *xdsapi.DeltaDiscoveryRequest) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stream.Send(req)
}

// onDemand tracks the Address names a ztunnel has asked for. A name stays
// subscribed for the life of the client (the server then pushes its changes,
// and an address that joins the mesh later), and is asked for again on
// every reconnect.
type onDemand struct {
	mu    sync.Mutex
	names map[string]*demand
	out   *sender // the live stream, nil between sessions
}

type demand struct {
	done chan struct{} // closed once a response answered the name
}

// attach sends the stream's first Address request, subscribed to the node
// scope and every name asked for so far, and makes out the stream Demand
// sends on. Holding the lock across the send keeps a concurrent Demand's
// request behind this first one.
func (o *onDemand) attach(out *sender, first *xdsapi.DeltaDiscoveryRequest) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	first.ResourceNamesSubscribe = []string{NodeScopeName}
	for n := range o.names {
		first.ResourceNamesSubscribe = append(first.ResourceNamesSubscribe, n)
	}
	if err := out.send(first); err != nil {
		return err
	}
	o.out = out
	return nil
}

func (o *onDemand) detach(out *sender) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.out == out {
		o.out = nil
	}
}

// answered closes the demands a response settles: a resource named so or
// carrying the name as an alias (found), or the name removed (not found).
func (o *onDemand) answered(resp *xdsapi.DeltaDiscoveryResponse) {
	o.mu.Lock()
	defer o.mu.Unlock()
	settle := func(name string) {
		if d, ok := o.names[name]; ok {
			select {
			case <-d.done:
			default:
				close(d.done)
			}
		}
	}
	for _, r := range resp.Resources {
		settle(r.Name)
		for _, a := range r.Aliases {
			settle(a)
		}
	}
	for _, n := range resp.RemovedResources {
		settle(n)
	}
}

// Demand subscribes to Address names (a workload uid, a service key, which
// brings the service's endpoints, or an address alias "<network>/<ip>") and
// waits until the control plane has answered each, found or not; the
// answers are in the State when it returns nil. Names answered before
// return at once. Without a connection the names are asked for when it
// comes back; ctx bounds the wait.
func (c *Client) Demand(ctx context.Context, names ...string) error {
	if !c.cfg.OnDemand {
		return nil // every address is pushed already
	}
	o := &c.od
	o.mu.Lock()
	var fresh []string
	waits := make([]chan struct{}, 0, len(names))
	for _, n := range names {
		d, ok := o.names[n]
		if !ok {
			d = &demand{done: make(chan struct{})}
			o.names[n] = d
			fresh = append(fresh, n)
		}
		waits = append(waits, d.done)
	}
	out := o.out
	o.mu.Unlock()
	if len(fresh) > 0 && out != nil {
		// A failed send ends the session; the next one asks again.
		_ = out.send(&xdsapi.DeltaDiscoveryRequest{TypeUrl: AddressType, ResourceNamesSubscribe: fresh})
	}
	for _, w := range waits {
		select {
		case <-w:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}
