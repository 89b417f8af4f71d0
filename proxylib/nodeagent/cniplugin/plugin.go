// Package cniplugin is the chained CNI plugin. The runtime runs it after the
// cluster's network plugin; it passes prevResult through unchanged and, on
// ADD, asks the node agent to capture the new sandbox before any container
// starts. A pod that should be captured never starts uncaptured: if the
// agent cannot be asked, ADD fails (the kubelet retries), except for pods
// known not to be captured (excluded namespaces, or — with a kubeconfig —
// pods the selection rules do not capture).
package cniplugin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
	corev1 "k8s.io/api/core/v1"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/ambientmesh/ambient/proxylib/discovery/selection"
	"github.com/ambientmesh/ambient/proxylib/nodeagent/cniapi"
)

// Conf is the plugin's entry in the conflist.
type Conf struct {
	types.PluginConf
	AgentSocket       string   `json:"agentSocket,omitempty"` // default cniapi.DefaultSocketPath
	ExcludeNamespaces []string `json:"excludeNamespaces,omitempty"`
	MeshNamespace     string   `json:"meshNamespace,omitempty"`
	// Kubeconfig lets the plugin decide on its own whether a pod is captured
	// when the agent is down (non-captured pods then still start).
	Kubeconfig string `json:"kubeconfig,omitempty"`
}

// K8sArgs are the kubelet's CNI_ARGS.
type K8sArgs struct {
	types.CommonArgs
	K8S_POD_NAME               types.UnmarshallableString //nolint:revive // CNI spelling
	K8S_POD_NAMESPACE          types.UnmarshallableString //nolint:revive
	K8S_POD_INFRA_CONTAINER_ID types.UnmarshallableString //nolint:revive
	K8S_POD_UID                types.UnmarshallableString //nolint:revive
}

// Main runs the plugin (the runtime sets CNI_COMMAND).
func Main() {
	skel.PluginMainFuncs(skel.CNIFuncs{Add: cmdAdd, Del: cmdDel, Check: cmdCheck, Status: func(*skel.CmdArgs) error { return nil }},
		version.All, "ambient-cni: ambient mesh capture (chained)")
}

func parse(args *skel.CmdArgs) (*Conf, *K8sArgs, error) {
	conf := &Conf{}
	if err := json.Unmarshal(args.StdinData, conf); err != nil {
		return nil, nil, fmt.Errorf("parse config: %w", err)
	}
	if err := version.ParsePrevResult(&conf.PluginConf); err != nil {
		return nil, nil, fmt.Errorf("parse prevResult: %w", err)
	}
	if conf.AgentSocket == "" {
		conf.AgentSocket = cniapi.DefaultSocketPath
	}
	k := &K8sArgs{}
	k.IgnoreUnknown = true
	if err := types.LoadArgs(args.Args, k); err != nil {
		return nil, nil, fmt.Errorf("parse CNI_ARGS: %w", err)
	}
	return conf, k, nil
}

func (c *Conf) excluded(ns string) bool {
	return ns == "kube-system" || ns == c.MeshNamespace || slices.Contains(c.ExcludeNamespaces, ns)
}

func cmdAdd(args *skel.CmdArgs) error {
	conf, k, err := parse(args)
	if err != nil {
		return err
	}
	if conf.PrevResult == nil {
		return errors.New("ambient-cni must be chained after the network plugin (no prevResult)")
	}
	pass := func() error { return types.PrintResult(conf.PrevResult, conf.CNIVersion) }
	ns, name := string(k.K8S_POD_NAMESPACE), string(k.K8S_POD_NAME)
	if ns == "" || name == "" || conf.excluded(ns) {
		return pass() // not a Kubernetes pod, or never captured
	}
	ev := cniapi.PodEvent{ContainerID: args.ContainerID, Netns: args.Netns, PodName: name, PodNamespace: ns, PodUID: string(k.K8S_POD_UID)}
	if res, err := current.NewResultFromResult(conf.PrevResult); err == nil {
		for _, ip := range res.IPs {
			ev.IPs = append(ev.IPs, ip.Address.IP.String())
		}
	}
	if f, err := os.Open(args.Netns); err == nil {
		defer f.Close() // held open until the agent answered
		ev.PluginPID, ev.NetnsFD = os.Getpid(), int(f.Fd())
	}
	var resp cniapi.AddResponse
	err = post(conf.AgentSocket, cniapi.PathAdd, ev, &resp)
	var unreachable *agentUnreachableError
	switch {
	case err == nil:
		return pass()
	case errors.As(err, &unreachable):
		capture, derr := conf.decideAlone(ns, name)
		if derr == nil && !capture {
			return pass()
		}
		return fmt.Errorf("pod %s/%s may need ambient capture but the node agent is unreachable (%v); refusing to start it uncaptured", ns, name, err)
	default:
		return fmt.Errorf("node agent could not capture pod %s/%s: %w", ns, name, err)
	}
}

// decideAlone applies the selection rules with the plugin's own API access.
func (c *Conf) decideAlone(ns, name string) (bool, error) {
	if c.Kubeconfig == "" {
		return false, errors.New("no kubeconfig to decide without the agent")
	}
	rc, err := clientcmd.BuildConfigFromFlags("", c.Kubeconfig)
	if err != nil {
		return false, err
	}
	rc.Timeout = 5 * time.Second
	cl, err := client.New(rc, client.Options{Scheme: clientgoscheme.Scheme})
	if err != nil {
		return false, err
	}
	ctx := context.Background()
	var pod corev1.Pod
	if err := cl.Get(ctx, client.ObjectKey{Namespace: ns, Name: name}, &pod); err != nil {
		return false, err
	}
	var namespace corev1.Namespace
	if err := cl.Get(ctx, client.ObjectKey{Name: ns}, &namespace); err != nil {
		return false, err
	}
	captured, _ := selection.Decide(selection.Config{MeshNamespace: c.MeshNamespace, ExcludedNamespaces: c.ExcludeNamespaces}, &namespace, &pod)
	return captured, nil
}

// cmdDel releases the sandbox; it never fails, as CNI DEL must be idempotent
// and the agent also releases pods when they disappear from the API.
func cmdDel(args *skel.CmdArgs) error {
	conf, k, err := parse(args)
	if err != nil {
		return nil
	}
	ns, name := string(k.K8S_POD_NAMESPACE), string(k.K8S_POD_NAME)
	if ns == "" || name == "" || conf.excluded(ns) {
		return nil
	}
	ev := cniapi.PodEvent{ContainerID: args.ContainerID, Netns: args.Netns, PodName: name, PodNamespace: ns, PodUID: string(k.K8S_POD_UID)}
	_ = post(conf.AgentSocket, cniapi.PathDel, ev, nil)
	return nil
}

func cmdCheck(args *skel.CmdArgs) error {
	_, _, err := parse(args)
	return err
}

type agentUnreachableError struct{ err error }

func (e *agentUnreachableError) Error() string { return "node agent unreachable: " + e.err.Error() }

func post(socket, path string, body, out any) error {
	b, err := json.Marshal(body)
	if err != nil {
		return err
	}
	hc := &http.Client{
		Timeout: 30 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		}},
	}
	resp, err := hc.Post("http://agent"+path, "application/json", bytes.NewReader(b))
	if err != nil {
		var op *net.OpError
		if errors.As(err, &op) && op.Op == "dial" {
			return &agentUnreachableError{err}
		}
		return err
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode >= 300 {
		return fmt.Errorf("agent: %s: %s", resp.Status, bytes.TrimSpace(data))
	}
	if out != nil && len(data) > 0 {
		return json.Unmarshal(data, out)
	}
	return nil
}
