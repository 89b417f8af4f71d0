// Command ambient-cni is both halves of ambient capture, in one binary:
//
//   - CNI plugin: when the container runtime runs it (CNI_COMMAND is set)
//     it acts as a chained CNI plugin (type "ambient-cni" in the conflist),
//     passing prevResult through and asking the node agent to capture the
//     new sandbox before its containers start.
//   - Node agent: `ambient-cni agent` (DaemonSet, hostNetwork, hostPID,
//     privileged) watches the node's pods and namespaces, installs in-pod
//     redirection and hands pod namespaces to ztunnel.
//
// Installing the plugin is copying this binary into the CNI bin dir and
// adding {"type": "ambient-cni", ...} as the last plugin of the conflist.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/go-logr/zapr"
	"go.uber.org/zap"
	ctrl "sigs.k8s.io/controller-runtime"

	"github.com/ambientmesh/ambient/cmd/ambient-cni/internal/agent"
	"github.com/ambientmesh/ambient/cmd/ambient-cni/internal/cniapi"
	"github.com/ambientmesh/ambient/cmd/ambient-cni/internal/plugin"
	"github.com/ambientmesh/ambient/proxylib/inpod"
	"github.com/ambientmesh/ambient/proxylib/redirect"
)

func main() {
	if os.Getenv("CNI_COMMAND") != "" {
		plugin.Main()
		return
	}
	if len(os.Args) < 2 || os.Args[1] != "agent" {
		fmt.Fprintln(os.Stderr, "usage: ambient-cni agent [flags]   (run by the container runtime as a CNI plugin otherwise)")
		os.Exit(2)
	}
	if err := runAgent(os.Args[2:]); err != nil {
		fmt.Fprintln(os.Stderr, "ambient-cni agent:", err)
		os.Exit(1)
	}
}

func runAgent(args []string) error {
	fs := flag.NewFlagSet("agent", flag.ExitOnError)
	o := agent.Options{Redirect: redirect.DefaultConfig()}
	var excluded string
	var debug bool
	fs.StringVar(&o.NodeName, "node-name", os.Getenv("NODE_NAME"), "this node's name (spec.nodeName of its pods)")
	fs.StringVar(&o.Selection.MeshNamespace, "mesh-namespace", envOr("POD_NAMESPACE", "ambient-system"), "namespace of the mesh itself (never captured)")
	fs.StringVar(&excluded, "excluded-namespaces", "", "comma-separated namespaces never captured")
	fs.StringVar(&o.ZtunnelSocket, "ztunnel-socket", inpod.DefaultSocketPath, "ztunnel's node agent socket")
	fs.StringVar(&o.CNISocket, "cni-socket", cniapi.DefaultSocketPath, "socket the CNI plugin calls")
	fs.StringVar(&o.StateDir, "state-dir", "/var/run/ambient/pods", "where sandbox records from the CNI plugin are kept")
	fs.StringVar(&o.ProcRoot, "proc", "/proc", "host /proc (the agent runs with hostPID)")
	fs.BoolVar(&debug, "debug", false, "debug logging")
	_ = fs.Parse(args)
	if excluded != "" {
		o.Selection.ExcludedNamespaces = strings.Split(excluded, ",")
	}
	zc := zap.NewProductionConfig()
	if debug {
		zc = zap.NewDevelopmentConfig()
	}
	zl, err := zc.Build()
	if err != nil {
		return err
	}
	o.Log = zapr.NewLogger(zl).WithName("node-agent")
	ctrl.SetLogger(o.Log)
	cfg, err := ctrl.GetConfig()
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	return agent.Run(ctx, cfg, o)
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}
