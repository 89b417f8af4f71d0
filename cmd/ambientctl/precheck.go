package main

import (
	"context"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kversion "k8s.io/apimachinery/pkg/version"
)

// minKubeMinor is the oldest Kubernetes 1.x precheck accepts: a floor
// above native sidecars (on by default since 1.29), which sidecar mode
// injects. Only 1.36 is tested (docs/compatibility.md).
const minKubeMinor = 30

// checkResult is one precheck line, as istioctl precheck's.
type checkResult struct {
	Check  string `json:"check"`
	Result string `json:"result"` // pass | fail | skipped
	Detail string `json:"detail"`
}

func checkKubeVersion(v *kversion.Info) checkResult {
	r := checkResult{Check: "Kubernetes version", Result: "pass", Detail: v.GitVersion}
	minor, err := strconv.Atoi(strings.TrimRight(v.Minor, "+"))
	if v.Major != "1" || err != nil {
		r.Result, r.Detail = "fail", fmt.Sprintf("cannot read the server version %q.%q", v.Major, v.Minor)
	} else if minor < minKubeMinor {
		r.Result, r.Detail = "fail", fmt.Sprintf("%s is older than 1.%d", v.GitVersion, minKubeMinor)
	}
	return r
}

// checkCNI: a node whose network is not ready (no CNI configured) says so
// in its Ready or NetworkUnavailable condition.
func checkCNI(nodes []corev1.Node) checkResult {
	r := checkResult{Check: "CNI present", Result: "pass", Detail: fmt.Sprintf("%d nodes with a ready network", len(nodes))}
	if len(nodes) == 0 {
		r.Result, r.Detail = "fail", "no nodes"
		return r
	}
	var bad []string
	for _, n := range nodes {
		for _, c := range n.Status.Conditions {
			notReady := c.Type == corev1.NodeReady && c.Status != corev1.ConditionTrue &&
				(strings.Contains(c.Message, "NetworkPluginNotReady") || strings.Contains(strings.ToLower(c.Message), "cni"))
			if notReady || (c.Type == corev1.NodeNetworkUnavailable && c.Status == corev1.ConditionTrue) {
				bad = append(bad, n.Name+": "+c.Message)
			}
		}
	}
	if len(bad) > 0 {
		r.Result, r.Detail = "fail", "network not ready on "+strings.Join(bad, "; ")
	}
	return r
}

// checkIstioConflict: istiod or Istio's ztunnel already running would
// fight the mesh over the same labels, CRDs and pod traffic.
func checkIstioConflict(deploys []appsv1.Deployment, daemonSets []appsv1.DaemonSet, meshNS string) checkResult {
	r := checkResult{Check: "no conflicting Istio install", Result: "pass", Detail: "no istiod, no Istio ztunnel"}
	var found []string
	for _, d := range deploys {
		if d.Name == "istiod" || strings.HasPrefix(d.Name, "istiod-") || d.Labels["app"] == "istiod" {
			found = append(found, "Deployment "+d.Namespace+"/"+d.Name)
		}
	}
	for _, ds := range daemonSets {
		if ds.Name == "ztunnel" && ds.Namespace != meshNS {
			found = append(found, "DaemonSet "+ds.Namespace+"/"+ds.Name)
		}
	}
	if len(found) > 0 {
		r.Result, r.Detail = "fail", "found "+strings.Join(found, ", ")
	}
	return r
}

// kernelModulesCheck cannot be answered through the API server: the
// modules are the nodes'. The node agent reports missing nftables/iptables
// support itself when it starts.
func kernelModulesCheck() checkResult {
	return checkResult{Check: "kernel modules (nf_tables / iptables)", Result: "skipped",
		Detail: "not visible through the API; on a node: lsmod | grep -E 'nf_tables|ip_tables' (the node agent fails readiness without them)"}
}

func precheckCmd(ctx context.Context, k *kube, out io.Writer) error {
	results := []checkResult{}
	if v, err := k.cs.Discovery().ServerVersion(); err != nil {
		results = append(results, checkResult{"Kubernetes version", "fail", err.Error()})
	} else {
		results = append(results, checkKubeVersion(v))
	}
	nodes, err := k.cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	results = append(results, checkCNI(nodes.Items))
	deploys, err := k.cs.AppsV1().Deployments("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	dss, err := k.cs.AppsV1().DaemonSets("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	meshNS := k.opts.meshNamespace
	if meshNS == "" {
		meshNS = defaultMeshNamespace
	}
	results = append(results, checkIstioConflict(deploys.Items, dss.Items, meshNS), kernelModulesCheck())
	if err := writePrecheck(out, results, k.opts.output); err != nil {
		return err
	}
	for _, r := range results {
		if r.Result == "fail" {
			return fmt.Errorf("precheck failed: %s: %s", r.Check, r.Detail)
		}
	}
	return nil
}

func writePrecheck(out io.Writer, results []checkResult, output string) error {
	if output != "" && output != "table" {
		return writeObjects(out, results, output)
	}
	tw := tabwriter.NewWriter(out, 0, 0, 3, ' ', 0)
	fmt.Fprintln(tw, "CHECK\tRESULT\tDETAIL")
	for _, r := range results {
		fmt.Fprintf(tw, "%s\t%s\t%s\n", r.Check, r.Result, r.Detail)
	}
	return tw.Flush()
}
