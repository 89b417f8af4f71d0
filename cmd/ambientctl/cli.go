package main

import (
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
)

// addFlags registers every flag. They are all persistent flags of the root:
// the command line has always accepted any flag before or after the command
// (`ambientctl -n demo waypoint apply`), and it still does.
func addFlags(fs *pflag.FlagSet, o *options) {
	o.kube = newConfigFlags(fs)
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
func parseArgs(args []string) (invocation, error) { return parseArgsTo(args, io.Discard) }

// parseArgsTo is parseArgs writing what cobra itself prints (help,
// completion scripts) to out. Such a command line yields cmd "help": nothing
// is left to run. Every error is a usage error.
func parseArgsTo(args []string, out io.Writer) (invocation, error) {
	var inv invocation
	root := newRootCmd(&inv)
	if args == nil {
		args = []string{} // cobra reads os.Args when given nil
	}
	root.SetArgs(args)
	root.SetOut(out)
	root.SetErr(out)
	inv.flagHelp = root.PersistentFlags().FlagUsages()
	if err := root.Execute(); err != nil {
		if !errors.Is(err, errUsage) {
			err = fmt.Errorf("%w: %v", errUsage, err)
		}
		return inv, err
	}
	if inv.cmd == "" {
		inv.cmd = "help"
	}
	return inv, nil
}

// newRootCmd builds the command tree. Its RunE functions only validate the
// command line into inv; main runs the invocation afterwards.
func newRootCmd(inv *invocation) *cobra.Command {
	root := &cobra.Command{
		Use:           "ambientctl",
		Short:         "inspect and operate the ambient mesh",
		SilenceErrors: true,
		SilenceUsage:  true,
		Args:          cobra.ArbitraryArgs,
		RunE: func(_ *cobra.Command, args []string) error {
			if len(args) == 0 {
				return fmt.Errorf("%w: no command given", errUsage)
			}
			return fmt.Errorf("%w: unknown command %q", errUsage, args[0])
		},
		PersistentPreRunE: func(*cobra.Command, []string) error {
			switch inv.opts.output {
			case "table", "json", "yaml":
				return nil
			}
			return fmt.Errorf("%w: unknown output format %q (table, json, yaml)", errUsage, inv.opts.output)
		},
	}
	addFlags(root.PersistentFlags(), &inv.opts)
	defaultHelp := root.HelpFunc()
	root.SetHelpFunc(func(c *cobra.Command, args []string) {
		if c == root {
			fmt.Fprint(c.OutOrStdout(), usage+root.PersistentFlags().FlagUsages())
			return
		}
		defaultHelp(c, args)
	})
	completeWords(root, "output", "table", "json", "yaml")
	completeWords(root, "for", "service", "workload", "all", "none")
	root.AddCommand(proxyConfigCmd(inv), waypointCmdTree(inv), gatewayCmd(inv), dashboardCommand(inv),
		noArgsCmd(inv, "status", "AmbientMesh conditions and the mesh's ztunnel and node-agent pods"),
		noArgsCmd(inv, "precheck", "cluster prerequisites of the mesh"),
		noArgsCmd(inv, "version", "print the version"))
	return root
}

// completeWords completes a persistent flag of root with fixed words.
func completeWords(root *cobra.Command, flag string, words ...string) {
	_ = root.RegisterFlagCompletionFunc(flag, func(*cobra.Command, []string, string) ([]string, cobra.ShellCompDirective) {
		return words, cobra.ShellCompDirectiveNoFileComp
	})
}

// proxyConfigSectionNames are the sections shell completion offers: the
// canonical names and istioctl's certificates.
var proxyConfigSectionNames = []string{"workloads", "secrets", "certificates", "services", "policies", "dns", "all"}

// noArgsCmd is a command that takes no positional arguments.
func noArgsCmd(inv *invocation, name, short string) *cobra.Command {
	return &cobra.Command{
		Use: name, Short: short, Args: cobra.ArbitraryArgs,
		RunE: func(_ *cobra.Command, args []string) error {
			inv.cmd = name
			if len(args) > 0 {
				return fmt.Errorf("%w: %s takes no arguments", errUsage, name)
			}
			return nil
		},
	}
}

func proxyConfigCmd(inv *invocation) *cobra.Command {
	return &cobra.Command{
		Use:     "proxy-config workloads|secrets|services|policies|dns|all [<pod>[.<namespace>]]",
		Aliases: []string{"pc", "ztunnel-config", "zc"}, // ztunnel-config: istioctl's name
		Short:   "show what a ztunnel (or waypoint) knows, from its admin endpoint",
		Args:    cobra.ArbitraryArgs,
		ValidArgsFunction: func(_ *cobra.Command, args []string, _ string) ([]string, cobra.ShellCompDirective) {
			if len(args) == 0 {
				return proxyConfigSectionNames, cobra.ShellCompDirectiveNoFileComp
			}
			return nil, cobra.ShellCompDirectiveNoFileComp // pods would need the cluster
		},
		RunE: func(_ *cobra.Command, pos []string) error {
			inv.cmd = "proxy-config"
			if len(pos) == 0 {
				return fmt.Errorf("%w: proxy-config needs a section: workloads, secrets, services, policies or all", errUsage)
			}
			sec, ok := proxyConfigSections[pos[0]]
			if !ok {
				return fmt.Errorf("%w: unknown proxy-config section %q", errUsage, pos[0])
			}
			inv.sub = sec
			if len(pos) > 2 {
				return fmt.Errorf("%w: proxy-config takes one pod, got %q", errUsage, pos[1:])
			}
			if len(pos) == 2 {
				inv.pod, inv.podNS = splitPodTarget(pos[1], inv.opts.flagNamespace())
			}
			return nil
		},
	}
}

func waypointCmdTree(inv *invocation) *cobra.Command {
	wp := &cobra.Command{
		Use:     "waypoint generate|apply|list|status|delete",
		Aliases: []string{"wp"},
		Short:   "manage the waypoints (WaypointPolicy objects) of a namespace",
		Args:    cobra.ArbitraryArgs,
		RunE: func(_ *cobra.Command, pos []string) error {
			inv.cmd = "waypoint"
			if len(pos) == 0 {
				return fmt.Errorf("%w: waypoint needs apply, list or delete", errUsage)
			}
			return fmt.Errorf("%w: unknown waypoint command %q (generate, apply, list, status, delete)", errUsage, pos[0])
		},
	}
	verb := func(name, short string, check func(pos []string) error) *cobra.Command {
		return &cobra.Command{
			Use: name, Short: short, Args: cobra.ArbitraryArgs,
			RunE: func(_ *cobra.Command, pos []string) error {
				inv.cmd, inv.sub = "waypoint", name
				return check(pos)
			},
		}
	}
	applyCheck := func(sub string) func([]string) error {
		return func(pos []string) error { return checkWaypointApply(sub, pos, inv.opts) }
	}
	noArgs := func(sub string) func([]string) error {
		return func(pos []string) error {
			if len(pos) > 0 {
				return fmt.Errorf("%w: waypoint %s takes no arguments (status: --name)", errUsage, sub)
			}
			return nil
		}
	}
	wp.AddCommand(
		verb("generate", "print the WaypointPolicy apply would create", applyCheck("generate")),
		verb("apply", "create or update a waypoint", applyCheck("apply")),
		verb("list", "list the waypoints", noArgs("list")),
		verb("status", "readiness of the namespace's waypoints (or of one, --name)", noArgs("status")),
		verb("delete", "delete waypoints", func(pos []string) error {
			inv.names = waypointDeleteNames(pos, inv.opts)
			if inv.opts.all && len(pos) > 0 {
				return fmt.Errorf("%w: waypoint delete: give names or --all, not both", errUsage)
			}
			return nil
		}),
	)
	return wp
}

// checkWaypointApply validates waypoint apply and generate.
func checkWaypointApply(sub string, pos []string, o options) error {
	if len(pos) > 0 {
		return fmt.Errorf("%w: waypoint %s takes no arguments (use --name, --for-service-account)", errUsage, sub)
	}
	switch meshv1.TrafficType(o.forTraffic) {
	case "", meshv1.TrafficService, meshv1.TrafficWorkload, meshv1.TrafficAll, meshv1.TrafficNone:
	default:
		return fmt.Errorf("%w: --for %q: want service, workload, all or none", errUsage, o.forTraffic)
	}
	if sub == "generate" && (o.enroll || o.wait) {
		return fmt.Errorf("%w: waypoint generate only prints the waypoint (no --enroll-namespace, --wait)", errUsage)
	}
	return nil
}

// waypointDeleteNames is what waypoint delete removes by name: the given
// names, else the default waypoint unless another selector was given.
func waypointDeleteNames(pos []string, o options) []string {
	if len(pos) > 0 {
		return pos
	}
	if o.serviceAccount == "" && o.name == "" && !o.all {
		return []string{defaultWaypointName}
	}
	return nil
}

func gatewayCmd(inv *invocation) *cobra.Command {
	wrong := func(*cobra.Command, []string) error {
		inv.cmd = "gateway"
		return fmt.Errorf("%w: gateway takes one command: list", errUsage)
	}
	gw := &cobra.Command{
		Use: "gateway list", Aliases: []string{"gw"}, Short: "ingress gateways and their routes",
		Args: cobra.ArbitraryArgs, RunE: wrong,
	}
	gw.AddCommand(&cobra.Command{
		Use: "list", Short: "list ingress gateways (Gateways of class istio)", Args: cobra.ArbitraryArgs,
		RunE: func(c *cobra.Command, pos []string) error {
			if len(pos) > 0 {
				return wrong(c, pos)
			}
			inv.cmd, inv.sub = "gateway", "list"
			return nil
		},
	})
	return gw
}

func dashboardCommand(inv *invocation) *cobra.Command {
	return &cobra.Command{
		Use: "dashboard", Aliases: []string{"dash"}, Short: "serve the live service graph of the mesh on localhost",
		Args: cobra.ArbitraryArgs,
		RunE: func(_ *cobra.Command, pos []string) error {
			inv.cmd = "dashboard"
			if len(pos) > 0 {
				return fmt.Errorf("%w: dashboard takes no arguments", errUsage)
			}
			if err := checkLoopback(inv.opts.listen); err != nil {
				return err
			}
			if inv.opts.refresh < time.Second {
				return fmt.Errorf("%w: --refresh %s: at least 1s", errUsage, inv.opts.refresh)
			}
			for _, m := range inv.opts.metricsURLs {
				t, err := parseMetricsURL(m)
				if err != nil {
					return err
				}
				inv.metricsURLs = append(inv.metricsURLs, t)
			}
			return nil
		},
	}
}
