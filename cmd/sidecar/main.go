// Command sidecar is the mesh proxy injected into one pod (the operator's
// sidecar injector): the same in-pod data path ztunnel serves for every
// captured pod of its node (proxylib/proxy: outbound :15001, inbound
// plaintext :15006, inbound HBONE :15008), serving only its own pod from
// inside the pod's network namespace, as the pod's own identity, without
// privileges. `sidecar init` is the injected init container that installs
// the pod's redirection (the only step needing CAP_NET_ADMIN). This file is
// wiring only.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/go-logr/logr"
	"go.uber.org/zap"

	"github.com/ambientmesh/ambient/proxylib/appprobe"
	"github.com/ambientmesh/ambient/proxylib/boot"
	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/envconfig"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/proxylib/inpod"
	"github.com/ambientmesh/ambient/proxylib/netnsutil"
	"github.com/ambientmesh/ambient/proxylib/redirect"
	"github.com/ambientmesh/ambient/proxylib/waypoint"
)

type options struct {
	*boot.Options
	podUID, serviceAccount string
	// appProbes: the app's original probes, run for the kubelet's
	// rewritten ones (proxylib/appprobe); podIP is where they go.
	appProbes appprobe.Probers
	podIP     string
}

// parseFlags reads the proxy's flags, defaulting each from its environment
// variable in e (set by the injector).
func parseFlags(fs *flag.FlagSet, args []string, e *envconfig.Env) (options, error) {
	var o options
	var err error
	if o.Options, err = boot.Flags(fs, e, ""); err != nil {
		return o, err
	}
	fs.StringVar(&o.podUID, "pod-uid", e.Get("POD_UID", ""), "this pod's UID (env POD_UID)")
	fs.StringVar(&o.serviceAccount, "service-account", e.Get("SERVICE_ACCOUNT", "default"), "this pod's service account (env SERVICE_ACCOUNT)")
	probes := fs.String("app-probes", e.Get(appprobe.EnvVar, ""), "the app's original probes, JSON (env "+appprobe.EnvVar+")")
	fs.StringVar(&o.podIP, "pod-ip", e.Get("INSTANCE_IP", ""), "this pod's IP, where app probes go (env INSTANCE_IP)")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	o.appProbes, err = appprobe.Parse(*probes)
	return o, err
}

type initOptions struct {
	uid                       uint
	backend                   string
	outPorts, inPorts, ranges string
}

// parseInitFlags reads `sidecar init`'s flags (env set by the injector from
// the pod's traffic.sidecar.istio.io annotations).
func parseInitFlags(fs *flag.FlagSet, args []string, e *envconfig.Env) (initOptions, error) {
	var o initOptions
	uid, err := strconv.ParseUint(e.Get("SIDECAR_UID", strconv.Itoa(redirect.SidecarUID)), 10, 32)
	if err != nil {
		return o, fmt.Errorf("bad SIDECAR_UID: %w", err)
	}
	fs.UintVar(&o.uid, "sidecar-uid", uint(uid), "the proxy's user, whose connections pass (env SIDECAR_UID)")
	fs.StringVar(&o.backend, "backend", e.Get("REDIRECT_BACKEND", "nftables"), "nftables or iptables (env REDIRECT_BACKEND)")
	fs.StringVar(&o.outPorts, "exclude-outbound-ports", e.Get("EXCLUDE_OUTBOUND_PORTS", ""), "env EXCLUDE_OUTBOUND_PORTS")
	fs.StringVar(&o.inPorts, "exclude-inbound-ports", e.Get("EXCLUDE_INBOUND_PORTS", ""), "env EXCLUDE_INBOUND_PORTS")
	fs.StringVar(&o.ranges, "exclude-outbound-ip-ranges", e.Get("EXCLUDE_OUTBOUND_IP_RANGES", ""), "env EXCLUDE_OUTBOUND_IP_RANGES")
	return o, fs.Parse(args)
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "init" {
		o, err := parseInitFlags(flag.NewFlagSet("sidecar init", flag.ExitOnError), os.Args[2:], envconfig.New(nil))
		if err == nil {
			err = installRedirection(o)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "sidecar init:", err)
			os.Exit(1)
		}
		fmt.Println("sidecar init: pod traffic redirected to the sidecar")
		return
	}
	boot.Main("sidecar", parseFlags, func(o options) string { return o.LogLevel }, run)
}

// installRedirection redirects this pod's TCP to the sidecar.
func installRedirection(o initOptions) error {
	ex, err := redirect.ParseExclusions(o.outPorts, o.inPorts, o.ranges)
	if err != nil {
		return err
	}
	cfg := redirect.SidecarConfig(uint32(o.uid), ex)
	var r redirect.Redirector
	switch o.backend {
	case "nftables":
		r = redirect.NewNFTables(cfg)
	case "iptables":
		r = redirect.NewIPTables(cfg)
	default:
		return fmt.Errorf("unknown backend %q (nftables or iptables)", o.backend)
	}
	self, err := netnsutil.Open("/proc/self/ns/net")
	if err != nil {
		return err
	}
	defer self.Close()
	return r.Install(self)
}

func run(o options, log logr.Logger, level zap.AtomicLevel) error {
	if o.PodName == "" || o.PodNamespace == "" {
		return errors.New("POD_NAME and POD_NAMESPACE are required")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	// Node stays empty: no destination is "local" to a sidecar, whose only
	// pod is its own (no ztunnel fast path).
	node := o.Node
	o.Node = ""
	p, err := boot.Start(ctx, o.Options, log, discovery.RoleSidecar, true)
	if err != nil {
		return err
	}
	defer p.Close()
	// The pod's L7 (its own inbound HTTP: L7 policy, istio_requests_*)
	// from the waypoint's engine. The mesh root namespace comes from the
	// control plane (its Mesh resource): until it has, policy fails closed.
	id := identity.Identity{TrustDomain: o.TrustDomain, Namespace: o.PodNamespace, ServiceAccount: o.serviceAccount}
	l7, err := waypoint.NewSidecar(waypoint.SidecarConfig{Pod: o.PodName, Namespace: o.PodNamespace, Identity: id,
		State: p.State, Registry: p.Metrics, Demand: p.Demand, Log: log, PodUID: discovery.PodUID(o.Cluster, o.PodNamespace, o.PodName)})
	if err != nil {
		return err
	}
	defer l7.Close()
	p.SetL7(l7)
	var serving atomic.Bool
	p.ServeEndpoints(level, serving.Load, &appprobe.Handler{Probers: o.appProbes, Host: o.podIP})
	uid := o.podUID
	if uid == "" {
		uid = discovery.PodUID(o.Cluster, o.PodNamespace, o.PodName)
	}
	info := inpod.WorkloadInfo{Name: o.PodName, Namespace: o.PodNamespace, ServiceAccount: o.serviceAccount}
	// Until the CA answers, retry: the pod's traffic is already redirected
	// here, so nothing leaves unprotected meanwhile.
	for delay := 200 * time.Millisecond; ; delay = min(2*delay, 5*time.Second) {
		self, err := netnsutil.Open("/proc/self/ns/net")
		if err != nil {
			return err
		}
		if err = p.Handler.AddWorkload(uid, info, self); err == nil {
			break
		}
		self.Close()
		log.Info("serving the pod failed, retrying", "error", err.Error(), "retryIn", delay.String())
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(delay):
		}
	}
	p.Handler.SnapshotDone()
	serving.Store(true)
	log.Info("sidecar started", "pod", o.PodNamespace+"/"+o.PodName, "node", node, "serviceAccount", o.serviceAccount, "transport", o.Transport)

	<-ctx.Done()
	p.Drain(o.DrainGrace)
	return nil
}
