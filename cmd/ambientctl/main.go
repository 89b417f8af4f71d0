// Command ambientctl inspects and operates the ambient mesh, like istioctl
// does for Istio. It also works as a kubectl plugin: install it on PATH as
// kubectl-ambient and run `kubectl ambient ...`.
//
//	ambientctl proxy-config workloads|secrets|services|policies|all [<ztunnel-pod>[.<namespace>]] [-o table|json|yaml]
//	ambientctl ztunnel-config workloads|certificates|services|policies|all (istioctl's name for proxy-config)
//	ambientctl waypoint generate|apply|list|status|delete [-n ns] [--for service|workload|all|none]
//	    [--for-service-account sa] [--name name] [--wait] [--enroll-namespace [--overwrite]]
//	ambientctl precheck
//	ambientctl status
//	ambientctl dashboard [--listen 127.0.0.1:20001] [--refresh 5s] [--metrics-url ROLE:NS/POD[/WORKLOAD]=URL ...]
//	ambientctl completion bash|zsh|fish|powershell
//
// It reads proxies through the API server (a port-forward to the admin port
// :15000), so it needs nothing but a kubeconfig. The command line is a cobra
// tree (cli.go) with kubectl's connection flags (k8s.io/cli-runtime).
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"k8s.io/cli-runtime/pkg/genericclioptions"

	"github.com/ambientmesh/ambient/proxylib/meshgraph/dashboard"
)

// errUsage marks errors that should be followed by the usage text.
var errUsage = errors.New("usage")

const usage = `ambientctl: inspect and operate the ambient mesh

Commands:
  proxy-config workloads|secrets|services|policies|dns|all [<pod>[.<namespace>]]
  ztunnel-config workloads|certificates|services|policies|all [<pod>[.<namespace>]]
      (istioctl's name for the same command; certificates = secrets)
      Show what a ztunnel (or waypoint) knows, read from its admin endpoint
      :15000/config_dump through the API server. Without a pod, the first
      ztunnel of the mesh namespace is used.
  waypoint generate [--for service|workload|all|none] [--for-service-account SA] [--name NAME]
      Print the WaypointPolicy apply would create (YAML, or -o json).
  waypoint apply [--for ...] [--for-service-account SA] [--name NAME] [--wait]
                 [--enroll-namespace [--overwrite]]
  waypoint list [-A]
  waypoint status [--name NAME]
      Readiness of the namespace's waypoints (or of one), as istioctl's.
  waypoint delete [NAME...] [--for-service-account SA] [--all]
      Manage waypoints (WaypointPolicy objects) of a namespace (-n).
  gateway list [-A]
      Ingress gateways (Gateways of class istio): address, Programmed,
      listeners with their attached routes, and the routes on each
      (HTTPRoute, GRPCRoute, TLSRoute, TCPRoute) with their Accepted state.
  precheck
      Cluster prerequisites: Kubernetes version, a CNI on every node, no
      istiod or Istio ztunnel already installed (kernel modules: skipped,
      not visible through the API). Non-zero exit when one fails.
  status
      AmbientMesh conditions and the mesh's ztunnel and node-agent pods.
  dashboard [--listen ADDR] [--refresh 5s]
      Serve the live service graph of the mesh on localhost: workloads and
      services, request and connection rates, errors, denied traffic, mTLS
      identities and the AuthorizationPolicies of each destination, built
      from every ztunnel's and waypoint's /metrics (:15020, read through the
      API server). --metrics-url ROLE:NAMESPACE/POD[/WORKLOAD]=URL (repeat;
      ROLE ztunnel, waypoint or gateway) scrapes proxies directly instead,
      without a cluster (no policy links then).
  version
  completion bash|zsh|fish|powershell
      Shell completion script (e.g. source <(ambientctl completion bash)).

Flags (--kubeconfig, --context, -n and the other connection flags are kubectl's):
`

// options are the flags of every command.
type options struct {
	// kube holds kubectl's connection flags (--kubeconfig, --context,
	// -n/--namespace, --cluster, --user, --as, ...), so they behave as kubectl's.
	kube           *genericclioptions.ConfigFlags
	allNamespaces  bool
	output         string
	meshNamespace  string
	serviceAccount string
	name           string
	wait           bool
	all            bool
	forTraffic     string // waypoint --for: service|workload|all|none
	enroll         bool   // waypoint apply --enroll-namespace
	overwrite      bool   // waypoint apply --overwrite
	timeout        time.Duration
	adminPort      int
	listen         string
	refresh        time.Duration
	metricsURLs    []string
}

// invocation is a parsed command line.
type invocation struct {
	cmd   string   // proxy-config | waypoint | status | version | help
	sub   string   // proxy-config: workloads|secrets|services|policies|dns|all; waypoint: apply|list|delete
	pod   string   // proxy-config target pod ("" = first ztunnel)
	podNS string   // namespace of the target pod ("" = mesh namespace)
	names []string // waypoint delete names
	// metricsURLs are dashboard --metrics-url targets
	metricsURLs []dashboard.URLTarget
	opts        options
	flagHelp    string
}

// splitPodTarget splits istioctl's "<pod>.<namespace>" form. Pod names may
// contain dots, so the namespace is what follows the last one.
func splitPodTarget(target, defaultNS string) (pod, ns string) {
	if i := strings.LastIndex(target, "."); i > 0 && i < len(target)-1 {
		return target[:i], target[i+1:]
	}
	return target, defaultNS
}

func main() {
	inv, err := parseArgsTo(os.Args[1:], os.Stdout)
	if err != nil { // every parse error is a usage error
		fmt.Fprintf(os.Stderr, "error: %v\n\n", strings.TrimPrefix(err.Error(), "usage: "))
		fmt.Fprint(os.Stderr, usage+inv.flagHelp)
		os.Exit(2)
	}
	if inv.cmd == "help" { // cobra printed the help or completion script
		return
	}
	if inv.cmd == "version" {
		fmt.Println("ambientctl", version)
		return
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if inv.cmd == "dashboard" { // runs until interrupted
		if err := dashboardCmd(ctx, inv, os.Stdout); err != nil {
			fmt.Fprintf(os.Stderr, "error: %v\n", err)
			os.Exit(1)
		}
		return
	}
	ctx, cancel := context.WithTimeout(ctx, inv.opts.timeout)
	defer cancel()
	if err := run(ctx, inv, os.Stdout); err != nil {
		fmt.Fprintf(os.Stderr, "error: %v\n", err)
		os.Exit(1)
	}
}

// version is set with -ldflags "-X main.version=...".
var version = "dev"

func run(ctx context.Context, inv invocation, out io.Writer) error {
	k, err := newKube(inv.opts)
	if err != nil {
		return err
	}
	switch inv.cmd {
	case "proxy-config":
		return proxyConfig(ctx, k, inv, out)
	case "waypoint":
		return waypointCmd(ctx, k, inv, out)
	case "gateway":
		return gatewayList(ctx, k, inv.opts, out)
	case "status":
		return status(ctx, k, inv.opts, out)
	case "precheck":
		return precheckCmd(ctx, k, out)
	}
	return fmt.Errorf("unknown command %q", inv.cmd)
}
