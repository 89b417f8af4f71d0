package discovery

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/go-logr/logr"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/ambientmesh/ambient/proxylib/discovery/xdsapi"
	"github.com/ambientmesh/ambient/proxylib/grpcwire"
)

// NodeInfo identifies the proxy to the control plane.
type NodeInfo struct {
	NodeName     string
	PodName      string
	PodNamespace string
	Role         string // RoleZtunnel, RoleWaypoint or RoleSidecar
}

// ID is the xDS node id, "<role>~<pod>.<namespace>".
func (n NodeInfo) ID() string { return n.Role + "~" + n.PodName + "." + n.PodNamespace }

// ClientConfig configures a Client.
type ClientConfig struct {
	// Address of the discovery server, host:port (port 15010).
	Address string
	// TLS verifies the server (mesh roots, ServerName ambient-controlplane.<ns>.svc).
	TLS *tls.Config
	// Token returns the bearer token (projected SA token, audience ambient-mesh).
	Token func() (string, error)
	Node  NodeInfo
	// TypeURLs to subscribe to; defaults to Address and Authorization.
	TypeURLs []string
	// Backoff bounds for reconnects; defaults 100ms and 2s. The cap bounds
	// how long proxies take to resync after the control plane returns (a
	// pod created while it was down is unknown until then), so it is
	// short; failed dials to a down server are cheap.
	MinBackoff, MaxBackoff time.Duration
	Log                    logr.Logger
	// OnDemand (ztunnels): subscribe to NodeScopeName instead of every
	// address, and look the rest up with Demand.
	OnDemand bool
}

// Client keeps a State in sync with the control plane over delta ADS. It
// reconnects with jittered exponential backoff; on reconnect it sends the
// versions it holds so the server replies with a diff. The State keeps
// serving what it last had while the client reconnects (to the same or
// another control-plane replica: versions are content hashes, the same on
// every replica).
type Client struct {
	cfg   ClientConfig
	state *State
	od    onDemand
}

// NewClient returns a client feeding state. Without cfg.TypeURLs it
// subscribes to the types state was created with (NewState(types...)), or
// Address and Authorization.
func NewClient(cfg ClientConfig, state *State) *Client {
	if len(cfg.TypeURLs) == 0 {
		cfg.TypeURLs = append([]string(nil), state.subscribed...)
	}
	if len(cfg.TypeURLs) == 0 {
		cfg.TypeURLs = []string{AddressType, AuthorizationType}
	}
	if cfg.MinBackoff <= 0 {
		cfg.MinBackoff = 100 * time.Millisecond
	}
	if cfg.MaxBackoff <= 0 {
		cfg.MaxBackoff = 2 * time.Second
	}
	return &Client{cfg: cfg, state: state, od: onDemand{names: map[string]*demand{}}}
}

// State returns the state the client feeds.
func (c *Client) State() *State { return c.state }

// Run connects and keeps the state in sync until ctx ends.
func (c *Client) Run(ctx context.Context) error {
	if c.cfg.TLS == nil {
		return errors.New("discovery client: TLS config is required")
	}
	wcfg := grpcwire.Config{
		Address: c.cfg.Address,
		TLS:     c.cfg.TLS,
		// A replica on a lost node neither answers nor resets the
		// connection: pings find it dead in under a minute (the server
		// allows one every 10s), and the stream moves to another replica.
		KeepaliveTime: 30 * time.Second, KeepaliveTimeout: 10 * time.Second,
		// A dial to a replica that is gone fails fast; the session loop
		// below redials within MaxBackoff.
		ConnectTimeout: 5 * time.Second,
	}
	if c.cfg.Token != nil {
		wcfg.Metadata = grpcwire.Bearer(c.cfg.Token)
	}
	conn, err := grpcwire.New(wcfg)
	if err != nil {
		return fmt.Errorf("discovery client: %w", err)
	}
	defer conn.Close()
	delay := c.cfg.MinBackoff
	for {
		gotResponse, err := c.session(ctx, conn)
		if ctx.Err() != nil {
			return nil
		}
		if gotResponse {
			delay = c.cfg.MinBackoff
		}
		wait := delay/2 + rand.N(delay/2+1)
		c.cfg.Log.Info("discovery stream ended; reconnecting", "error", err, "in", wait)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
		delay = min(delay*2, c.cfg.MaxBackoff)
	}
}

func (c *Client) node() (*xdsapi.Node, error) {
	md, err := structpb.NewStruct(map[string]any{
		MetaNodeName:     c.cfg.Node.NodeName,
		MetaPodName:      c.cfg.Node.PodName,
		MetaPodNamespace: c.cfg.Node.PodNamespace,
		MetaRole:         c.cfg.Node.Role,
	})
	if err != nil {
		return nil, err
	}
	return &xdsapi.Node{Id: c.cfg.Node.ID(), Metadata: md}, nil
}

// session runs one stream; it reports whether any response arrived.
func (c *Client) session(ctx context.Context, conn *grpcwire.Conn) (bool, error) {
	stream, err := xdsapi.OpenDeltaStream(ctx, conn)
	if err != nil {
		return false, err
	}
	defer stream.Close()
	node, err := c.node()
	if err != nil {
		return false, err
	}
	out := &sender{stream: stream}
	for i, t := range c.cfg.TypeURLs {
		req := &xdsapi.DeltaDiscoveryRequest{
			TypeUrl:                 t,
			ResourceNamesSubscribe:  []string{"*"},
			InitialResourceVersions: c.state.Versions(t),
		}
		if i == 0 {
			req.Node = node
		}
		if t == AddressType && c.cfg.OnDemand {
			// The names asked for so far; from now on Demand sends its
			// own requests on this stream.
			defer c.od.detach(out)
			if err := c.od.attach(out, req); err != nil {
				return false, err
			}
			continue
		}
		if err := out.send(req); err != nil {
			return false, err
		}
	}
	got := false
	for {
		resp, err := stream.Recv()
		if err != nil {
			return got, err
		}
		got = true
		ack := &xdsapi.DeltaDiscoveryRequest{TypeUrl: resp.TypeUrl, ResponseNonce: resp.Nonce}
		if err := c.apply(resp); err != nil {
			c.cfg.Log.Error(err, "rejecting discovery response", "type", resp.TypeUrl, "nonce", resp.Nonce)
			ack.ErrorDetail = &xdsapi.Status{Code: int32(grpcwire.InvalidArgument), Message: err.Error()}
		} else if resp.TypeUrl == AddressType {
			c.od.answered(resp)
		}
		if err := out.send(ack); err != nil {
			return got, err
		}
	}
}

func (c *Client) apply(resp *xdsapi.DeltaDiscoveryResponse) error {
	if !c.subscribed(resp.TypeUrl) {
		return fmt.Errorf("unexpected type %q", resp.TypeUrl)
	}
	updated := make([]Resource, 0, len(resp.Resources))
	for _, r := range resp.Resources {
		updated = append(updated, Resource{Name: r.Name, Version: r.Version, Body: r.Resource})
	}
	return c.state.Apply(resp.TypeUrl, updated, resp.RemovedResources)
}

func (c *Client) subscribed(typeURL string) bool {
	for _, t := range c.cfg.TypeURLs {
		if t == typeURL {
			return true
		}
	}
	return false
}
