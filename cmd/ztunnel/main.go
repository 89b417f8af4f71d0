// Command ztunnel is the per-node L4 proxy: it learns workloads, services
// and policies from the control plane (delta xDS), gets certificates from
// the mesh CA, receives captured pods' network namespaces from the node
// agent (ZDS over a unix socket), and serves the L4 data path inside each
// pod (proxylib/proxy, started by proxylib/boot). This file is wiring only.
package main

import (
	"context"
	"errors"
	"flag"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/go-logr/logr"
	"go.uber.org/zap"

	"github.com/ambientmesh/ambient/proxylib/boot"
	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/envconfig"
	"github.com/ambientmesh/ambient/proxylib/inpod"
)

type options struct {
	*boot.Options
	zdsSocket string
}

// parseFlags reads the flags in args, defaulting each from its environment
// variable in e (the operator's contract, docs/interfaces.md).
func parseFlags(fs *flag.FlagSet, args []string, e *envconfig.Env) (options, error) {
	var o options
	var err error
	if o.Options, err = boot.Flags(fs, e, "ztunnel"); err != nil {
		return o, err
	}
	fs.StringVar(&o.zdsSocket, "zds-socket", e.Get("ZDS_SOCKET", "/var/run/ambient/ztunnel.sock"), "node agent socket")
	fs.StringVar(&o.HandoverSocket, "handover-socket", e.Get("HANDOVER_SOCKET", ""), "unix socket where a draining ztunnel hands its connections to the newest one (default: ztunnel-handover.sock next to -zds-socket; \"off\" disables hand-over)")
	// The DNS proxy serves the pods whose DNS the node agent captures.
	o.DNS = &boot.DNSOptions{}
	fs.StringVar(&o.DNS.ClusterDomain, "cluster-domain", e.Get("CLUSTER_DOMAIN", "cluster.local"), "Kubernetes cluster domain (DNS proxy answers <svc>.<ns>.svc.<domain>)")
	fs.StringVar(&o.DNS.ResolvConf, "dns-resolv-conf", "/etc/resolv.conf", "resolvers the DNS proxy forwards to for pods whose own resolvers are unknown")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	switch o.HandoverSocket {
	case "":
		o.HandoverSocket = filepath.Join(filepath.Dir(o.zdsSocket), "ztunnel-handover.sock")
	case "off":
		o.HandoverSocket = ""
	}
	return o, nil
}

func main() {
	boot.Main("ztunnel", parseFlags, func(o options) string { return o.LogLevel }, run)
}

var newLogger = boot.NewLogger

func run(o options, log logr.Logger, level zap.AtomicLevel) error {
	if o.Node == "" {
		return errors.New("NODE_NAME is required")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	p, err := boot.Start(ctx, o.Options, log, discovery.RoleZtunnel, false)
	if err != nil {
		return err
	}
	defer p.Close()
	// The node agent stays connected while we drain, so a pod deleted
	// meanwhile is still released here.
	zdsCtx, stopZDS := context.WithCancel(context.Background())
	defer stopZDS()
	zds := inpod.NewServer(o.zdsSocket, p.Handler, log.WithName("zds"))
	go func() {
		if err := zds.ListenAndServe(zdsCtx); err != nil && zdsCtx.Err() == nil {
			log.Error(err, "node agent socket stopped")
		}
	}()
	p.ServeEndpoints(level, p.SnapshotReceived, nil)
	log.Info("ztunnel started", "node", o.Node, "transport", o.Transport)

	<-ctx.Done()
	p.Drain(o.DrainGrace)
	return nil
}
