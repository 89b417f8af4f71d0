// Command ambient-cni is both halves of ambient capture, in one binary:
//
//   - CNI plugin: when the container runtime runs it (CNI_COMMAND is set)
//     it acts as a chained CNI plugin (type "ambient-cni" in the conflist),
//     passing prevResult through and asking the node agent to capture the
//     new sandbox before its containers start.
//   - Node agent: `ambient-cni node-agent` (alias `agent`; DaemonSet,
//     hostNetwork, privileged, host /proc mounted at /host/proc) watches the
//     node's pods and namespaces, installs in-pod redirection, hands pod
//     namespaces to ztunnel, and installs the plugin: it copies itself to
//     CNI_BIN_DIR/ambient-cni and appends {"type":"ambient-cni",...} to the
//     primary configuration in CNI_CONF_DIR.
//
// Every flag defaults from the environment the operator's DaemonSet sets.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/go-logr/logr"
	"github.com/go-logr/zapr"
	"go.uber.org/zap"
	ctrl "sigs.k8s.io/controller-runtime"

	"github.com/ambientmesh/ambient/proxylib/envconfig"
	"github.com/ambientmesh/ambient/proxylib/inpod"
	"github.com/ambientmesh/ambient/proxylib/logging"
	"github.com/ambientmesh/ambient/proxylib/nodeagent"
	"github.com/ambientmesh/ambient/proxylib/nodeagent/cniapi"
	"github.com/ambientmesh/ambient/proxylib/nodeagent/cniplugin"
	"github.com/ambientmesh/ambient/proxylib/redirect"
)

func main() {
	if os.Getenv("CNI_COMMAND") != "" {
		cniplugin.Main()
		return
	}
	if len(os.Args) < 2 || (os.Args[1] != "agent" && os.Args[1] != "node-agent") {
		fmt.Fprintln(os.Stderr, "usage: ambient-cni node-agent [flags]   (run by the container runtime as a CNI plugin otherwise)")
		os.Exit(2)
	}
	if err := runAgent(os.Args[2:]); err != nil {
		fmt.Fprintln(os.Stderr, "ambient-cni agent:", err)
		os.Exit(1)
	}
}

// newLogger is the node agent's JSON logger at level name.
func newLogger(name string) (logr.Logger, zap.AtomicLevel, error) {
	level, err := logging.NewAtomicLevel(name)
	if err != nil {
		return logr.Logger{}, level, err
	}
	zc := zap.NewProductionConfig()
	zc.Level = level
	zl, err := zc.Build()
	if err != nil {
		return logr.Logger{}, zap.AtomicLevel{}, err
	}
	return zapr.NewLogger(zl), zc.Level, nil
}

// agentFlags are the node agent's settings that are not nodeagent.Options.
type agentFlags struct{ backend, logLevel, inbound string }

// parseAgentFlags reads the node agent's flags in args, defaulting each
// from its environment variable in e (the operator's contract).
func parseAgentFlags(fs *flag.FlagSet, args []string, e *envconfig.Env) (nodeagent.Options, agentFlags, error) {
	o := nodeagent.Options{Redirect: redirect.DefaultConfig()}
	var f agentFlags
	var excluded, healthPort, healthAddr string
	env := e.Get
	fs.StringVar(&o.NodeName, "node-name", env("NODE_NAME", ""), "this node's name (spec.nodeName of its pods)")
	fs.StringVar(&o.MeshName, "mesh-name", env("MESH_NAME", ""), "AmbientMesh whose removal releases every pod")
	fs.StringVar(&o.Selection.MeshNamespace, "mesh-namespace", env("MESH_NAMESPACE", env("POD_NAMESPACE", "ambient-system")), "namespace of the mesh itself (never captured)")
	fs.StringVar(&excluded, "excluded-namespaces", env("EXCLUDED_NAMESPACES", ""), "comma-separated namespaces never captured")
	fs.StringVar(&f.backend, "redirection", env("REDIRECTION_BACKEND", "nftables"), "nftables or iptables")
	fs.StringVar(&o.ZtunnelSocket, "ztunnel-socket", env("ZDS_SOCKET", inpod.DefaultSocketPath), "ztunnel's node agent socket")
	fs.StringVar(&o.CNISocket, "cni-socket", env("CNI_SOCKET", cniapi.DefaultSocketPath), "socket the CNI plugin calls (same path on the host)")
	fs.StringVar(&o.CNIBinDir, "cni-bin-dir", env("CNI_BIN_DIR", ""), "install the plugin binary here (empty: do not)")
	fs.StringVar(&o.CNIConfDir, "cni-conf-dir", env("CNI_CONF_DIR", ""), "chain the plugin into the primary config here (empty: do not, or detect with --cni-host-root)")
	fs.StringVar(&o.CNIHostRoot, "cni-host-root", env("CNI_HOST_ROOT", ""), "the host's / mounted here: the CNI dirs are host paths under it, detected when empty (k3s, microk8s, OpenShift, standard)")
	fs.StringVar(&o.StateDir, "state-dir", env("STATE_DIR", "/var/run/ambient/pods"), "where sandbox records from the CNI plugin are kept")
	fs.StringVar(&o.ProcRoot, "proc", env("PROC_ROOT", defaultProc()), "the host's /proc")
	fs.StringVar(&healthPort, "health-port", env("HEALTH_PORT", "15022"), "port of /healthz and /readyz on all addresses (empty: off)")
	fs.StringVar(&healthAddr, "health-addr", "", "host:port of /healthz and /readyz (overrides --health-port)")
	fs.BoolVar(&o.Redirect.PreserveSource, "preserve-source", env("PRESERVE_SOURCE", "true") == "true", "install the connmark/policy routing that lets ztunnel connect to apps from the client's address (apps see the real client IP)")
	fs.StringVar(&f.inbound, "inbound-capture", env("INBOUND_CAPTURE", "NAT"), "how inbound TCP reaches ztunnel: NAT (REDIRECT) or TPROXY (apps see every client's own address, also outside the mesh; nftables only)")
	fs.BoolVar(&o.DNSCapture, "dns-capture", env("DNS_CAPTURE", "false") == "true", "send captured pods' DNS (UDP/TCP 53) to ztunnel's DNS proxy; a pod's ambient.istio.io/dns-capture annotation overrides it")
	fs.BoolVar(&o.ProbeSNAT, "probe-snat", env("PROBE_SNAT", "true") == "true", "SNAT the node's own connections to captured pods (kubelet probes) so they bypass capture")
	fs.StringVar(&f.logLevel, "log-level", env("LOG_LEVEL", "info"), "trace, debug, info, warn, error")
	if err := fs.Parse(args); err != nil {
		return o, f, err
	}
	if excluded != "" {
		o.Selection.ExcludedNamespaces = strings.Split(excluded, ",")
	}
	if healthPort != "" {
		o.HealthAddr = ":" + healthPort
	}
	if healthAddr != "" {
		o.HealthAddr = healthAddr
	}
	switch f.inbound {
	case "", "NAT":
	case "TPROXY":
		// Never a silent fallback to NAT: the iptables backend refuses to
		// install TPROXY rules, so every capture fails (new pods do not
		// start, captured pods keep their rules) with an event naming it.
		o.Redirect.InboundTPROXY = true
	default:
		return o, f, fmt.Errorf("unknown inbound capture mode %q (NAT or TPROXY)", f.inbound)
	}
	switch f.backend {
	case "", "nftables":
		o.Redirector, o.DNSRedirector = redirect.NewNFTables(o.Redirect), redirect.NewNFTables(o.Redirect.WithDNS())
	case "iptables":
		o.Redirector, o.DNSRedirector = redirect.NewIPTables(o.Redirect), redirect.NewIPTables(o.Redirect.WithDNS())
	default:
		return o, f, fmt.Errorf("unknown redirection backend %q (nftables or iptables)", f.backend)
	}
	excl := append([]string{"kube-system"}, o.Selection.ExcludedNamespaces...)
	o.PluginConf = map[string]any{"agentSocket": o.CNISocket, "meshNamespace": o.Selection.MeshNamespace, "excludeNamespaces": excl}
	return o, f, nil
}

func runAgent(args []string) error {
	o, f, err := parseAgentFlags(flag.NewFlagSet("node-agent", flag.ExitOnError), args, envconfig.New(nil))
	if err != nil {
		return err
	}
	log, _, err := newLogger(f.logLevel)
	if err != nil {
		return fmt.Errorf("log level: %w", err)
	}
	o.Log = log.WithName("node-agent")
	o.Log.Info("in-pod redirection", "backend", f.backend, "preserveSource", o.Redirect.PreserveSource, "dnsCapture", o.DNSCapture, "inboundCapture", f.inbound)
	if !o.Redirect.PreserveSource {
		o.Log.Info("source preservation is off: apps behind ztunnel see their own pod address instead of the client's")
	}
	ctrl.SetLogger(o.Log)
	cfg, err := ctrl.GetConfig()
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	return nodeagent.Run(ctx, cfg, o)
}

// defaultProc prefers the host's /proc mounted at /host/proc (DaemonSet).
func defaultProc() string {
	if _, err := os.Stat("/host/proc/1"); err == nil {
		return "/host/proc"
	}
	return "/proc"
}
