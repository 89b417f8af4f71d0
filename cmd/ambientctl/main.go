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
//
// It reads proxies through the API server (a port-forward to the admin port
// :15000), so it needs nothing but a kubeconfig.
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

	"github.com/spf13/pflag"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
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

Flags:
`

// options are the flags of every command.
type options struct {
	kubeconfig     string
	context        string
	namespace      string
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

func newFlagSet(o *options) *pflag.FlagSet {
	fs := pflag.NewFlagSet("ambientctl", pflag.ContinueOnError)
	fs.SetInterspersed(true)
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "path to the kubeconfig (default: $KUBECONFIG or ~/.kube/config)")
	fs.StringVar(&o.context, "context", "", "kubeconfig context to use")
	fs.StringVarP(&o.namespace, "namespace", "n", "", "namespace (default: the kubeconfig's namespace)")
	fs.BoolVarP(&o.allNamespaces, "all-namespaces", "A", false, "waypoint list: every namespace")
	fs.StringVarP(&o.output, "output", "o", "table", "output format: table, json or yaml")
	fs.StringVar(&o.meshNamespace, "mesh-namespace", "", "namespace of the mesh components (default: from the AmbientMesh, else ambient-system)")
	fs.StringVarP(&o.serviceAccount, "for-service-account", "s", "", "waypoint: serve only this service account")
	fs.StringVar(&o.name, "name", "", "waypoint: name of the WaypointPolicy (default: waypoint, or the service account)")
	fs.BoolVar(&o.wait, "wait", false, "waypoint apply: wait until the waypoint is Ready")
	fs.StringVar(&o.forTraffic, "for", "", "waypoint apply|generate: traffic the waypoint serves: service, workload, all or none (as istioctl; default service)")
	fs.BoolVar(&o.enroll, "enroll-namespace", false, "waypoint apply: label the namespace istio.io/use-waypoint=<name>")
	fs.BoolVar(&o.overwrite, "overwrite", false, "waypoint apply --enroll-namespace: replace the namespace's use-waypoint label naming another waypoint")
	fs.BoolVar(&o.all, "all", false, "waypoint delete: every waypoint of the namespace")
	fs.DurationVar(&o.timeout, "timeout", 60*time.Second, "overall timeout")
	fs.IntVar(&o.adminPort, "admin-port", 15000, "proxy admin port")
	fs.StringVar(&o.listen, "listen", "127.0.0.1:20001", "dashboard: loopback address to serve on (port 0 picks a free one)")
	fs.DurationVar(&o.refresh, "refresh", 5*time.Second, "dashboard: how often the proxies are scraped")
	fs.StringArrayVar(&o.metricsURLs, "metrics-url", nil, "dashboard: scrape ROLE:NAMESPACE/POD[/WORKLOAD]=URL instead of the cluster's proxies (repeatable)")
	return fs
}

var proxyConfigSections = map[string]string{
	"workload": "workloads", "workloads": "workloads", "wl": "workloads",
	"secret": "secrets", "secrets": "secrets",
	"certificate": "secrets", "certificates": "secrets", "certs": "secrets", // istioctl ztunnel-config's name
	"service": "services", "services": "services", "svc": "services",
	"policy": "policies", "policies": "policies",
	"dns": "dns",
	"all": "all",
}

// parseArgs turns a command line into an invocation; it never touches a cluster.
func parseArgs(args []string) (invocation, error) {
	var inv invocation
	fs := newFlagSet(&inv.opts)
	fs.SetOutput(io.Discard)
	inv.flagHelp = fs.FlagUsages()
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			inv.cmd = "help"
			return inv, nil
		}
		return inv, fmt.Errorf("%w: %v", errUsage, err)
	}
	switch inv.opts.output {
	case "table", "json", "yaml":
	default:
		return inv, fmt.Errorf("%w: unknown output format %q (table, json, yaml)", errUsage, inv.opts.output)
	}
	pos := fs.Args()
	if len(pos) == 0 {
		return inv, fmt.Errorf("%w: no command given", errUsage)
	}
	inv.cmd, pos = pos[0], pos[1:]
	switch inv.cmd {
	case "proxy-config", "pc", "ztunnel-config", "zc": // ztunnel-config: istioctl's name
		inv.cmd = "proxy-config"
		if len(pos) == 0 {
			return inv, fmt.Errorf("%w: proxy-config needs a section: workloads, secrets, services, policies or all", errUsage)
		}
		sec, ok := proxyConfigSections[pos[0]]
		if !ok {
			return inv, fmt.Errorf("%w: unknown proxy-config section %q", errUsage, pos[0])
		}
		inv.sub = sec
		if len(pos) > 2 {
			return inv, fmt.Errorf("%w: proxy-config takes one pod, got %q", errUsage, pos[1:])
		}
		if len(pos) == 2 {
			inv.pod, inv.podNS = splitPodTarget(pos[1], inv.opts.namespace)
		}
	case "waypoint", "wp":
		inv.cmd = "waypoint"
		if len(pos) == 0 {
			return inv, fmt.Errorf("%w: waypoint needs apply, list or delete", errUsage)
		}
		inv.sub, pos = pos[0], pos[1:]
		switch inv.sub {
		case "apply", "generate":
			if len(pos) > 0 {
				return inv, fmt.Errorf("%w: waypoint %s takes no arguments (use --name, --for-service-account)", errUsage, inv.sub)
			}
			switch meshv1.TrafficType(inv.opts.forTraffic) {
			case "", meshv1.TrafficService, meshv1.TrafficWorkload, meshv1.TrafficAll, meshv1.TrafficNone:
			default:
				return inv, fmt.Errorf("%w: --for %q: want service, workload, all or none", errUsage, inv.opts.forTraffic)
			}
			if inv.sub == "generate" && (inv.opts.enroll || inv.opts.wait) {
				return inv, fmt.Errorf("%w: waypoint generate only prints the waypoint (no --enroll-namespace, --wait)", errUsage)
			}
		case "list", "status":
			if len(pos) > 0 {
				return inv, fmt.Errorf("%w: waypoint %s takes no arguments (status: --name)", errUsage, inv.sub)
			}
		case "delete":
			if len(pos) > 0 {
				inv.names = pos
			}
			if len(pos) == 0 && inv.opts.serviceAccount == "" && inv.opts.name == "" && !inv.opts.all {
				inv.names = []string{defaultWaypointName}
			}
			if inv.opts.all && len(pos) > 0 {
				return inv, fmt.Errorf("%w: waypoint delete: give names or --all, not both", errUsage)
			}
		default:
			return inv, fmt.Errorf("%w: unknown waypoint command %q (generate, apply, list, status, delete)", errUsage, inv.sub)
		}
	case "gateway", "gw":
		inv.cmd = "gateway"
		if len(pos) != 1 || pos[0] != "list" {
			return inv, fmt.Errorf("%w: gateway takes one command: list", errUsage)
		}
		inv.sub = "list"
	case "dashboard", "dash":
		inv.cmd = "dashboard"
		if len(pos) > 0 {
			return inv, fmt.Errorf("%w: dashboard takes no arguments", errUsage)
		}
		if err := checkLoopback(inv.opts.listen); err != nil {
			return inv, err
		}
		if inv.opts.refresh < time.Second {
			return inv, fmt.Errorf("%w: --refresh %s: at least 1s", errUsage, inv.opts.refresh)
		}
		for _, m := range inv.opts.metricsURLs {
			t, err := parseMetricsURL(m)
			if err != nil {
				return inv, err
			}
			inv.metricsURLs = append(inv.metricsURLs, t)
		}
	case "status", "version", "help", "precheck":
		if len(pos) > 0 {
			return inv, fmt.Errorf("%w: %s takes no arguments", errUsage, inv.cmd)
		}
	default:
		return inv, fmt.Errorf("%w: unknown command %q", errUsage, inv.cmd)
	}
	return inv, nil
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
	inv, err := parseArgs(os.Args[1:])
	if inv.cmd == "help" || errors.Is(err, errUsage) {
		w := os.Stdout
		if err != nil {
			w = os.Stderr
			fmt.Fprintf(w, "error: %v\n\n", strings.TrimPrefix(err.Error(), "usage: "))
		}
		fmt.Fprint(w, usage+inv.flagHelp)
		if err != nil {
			os.Exit(2)
		}
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
