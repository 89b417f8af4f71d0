package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sort"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apimeta "k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"

	"github.com/ambientmesh/ambient/proxylib/meshgraph"
	"github.com/ambientmesh/ambient/proxylib/meshgraph/dashboard"
)

// proxySelector selects every proxy the operator runs, as the
// config/prometheus PodMonitors do.
const proxySelector = "app.kubernetes.io/managed-by=ambient-operator,app.kubernetes.io/component in (ztunnel,waypoint,ingress-gateway)"

const metricsPort = 15020

var authzPolicyList = schema.GroupVersionKind{Group: "security.istio.io", Version: "v1", Kind: "AuthorizationPolicyList"}

// parseMetricsURL reads --metrics-url ROLE:NAMESPACE/POD[/WORKLOAD]=URL.
func parseMetricsURL(s string) (dashboard.URLTarget, error) {
	spec, u, ok := strings.Cut(s, "=")
	role, id, ok2 := strings.Cut(spec, ":")
	parts := strings.Split(id, "/")
	if !ok || !ok2 || u == "" || len(parts) < 2 || len(parts) > 3 || parts[0] == "" || parts[1] == "" {
		return dashboard.URLTarget{}, fmt.Errorf("%w: --metrics-url %q: want ROLE:NAMESPACE/POD[/WORKLOAD]=URL", errUsage, s)
	}
	switch role {
	case "ztunnel", "waypoint", "gateway":
	default:
		return dashboard.URLTarget{}, fmt.Errorf("%w: --metrics-url %q: role must be ztunnel, waypoint or gateway", errUsage, s)
	}
	t := meshgraph.Target{Role: role, Namespace: parts[0], Pod: parts[1], Workload: parts[1]}
	if len(parts) == 3 {
		t.Workload = parts[2]
	}
	return dashboard.URLTarget{Target: t, URL: u}, nil
}

// checkLoopback refuses to serve the mesh's graph beyond this machine.
func checkLoopback(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%w: --listen %q: %v", errUsage, addr, err)
	}
	if host == "localhost" {
		return nil
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("%w: --listen %q: the dashboard serves on a loopback address only", errUsage, addr)
	}
	return nil
}

// dashboardCmd serves the graph until ctx ends.
func dashboardCmd(ctx context.Context, inv invocation, out io.Writer) error {
	var src dashboard.Source
	if len(inv.metricsURLs) > 0 {
		src = &dashboard.URLSource{Targets: inv.metricsURLs}
	} else {
		k, err := newKube(inv.opts)
		if err != nil {
			return err
		}
		src = &kubeSource{k: k, timeout: inv.opts.refresh * 3}
	}
	ln, err := net.Listen("tcp", inv.opts.listen)
	if err != nil {
		return err
	}
	s := dashboard.New(src, inv.opts.refresh)
	go s.Run(ctx)
	srv := &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		_ = srv.Close()
	}()
	host := ln.Addr().String()
	if h, p, err := net.SplitHostPort(host); err == nil && net.ParseIP(h).IsLoopback() && net.ParseIP(h).To4() != nil {
		host = net.JoinHostPort("localhost", p)
	}
	fmt.Fprintf(out, "ambientctl dashboard: http://%s/ (Ctrl-C to stop)\n", host)
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// kubeSource reads the proxies' /metrics (:15020) through the API server,
// the way proxy-config reads their admin port.
type kubeSource struct {
	k       *kube
	timeout time.Duration
}

func (s *kubeSource) Scrape(ctx context.Context) (*meshgraph.Snapshot, []string) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	pods, err := s.k.cs.CoreV1().Pods("").List(ctx, metav1.ListOptions{LabelSelector: proxySelector})
	if err != nil {
		return &meshgraph.Snapshot{At: time.Now()}, []string{"listing proxies: " + err.Error()}
	}
	var (
		mu   sync.Mutex
		wg   sync.WaitGroup
		errs []string
		snap = &meshgraph.Snapshot{}
	)
	for i := range pods.Items {
		p := &pods.Items[i]
		if p.Status.Phase != corev1.PodRunning || p.DeletionTimestamp != nil {
			continue
		}
		t := targetOf(p)
		wg.Add(1)
		go func() {
			defer wg.Done()
			body, err := s.k.podGet(ctx, p.Namespace, p.Name, metricsPort, "/metrics")
			var sc meshgraph.Scrape
			if err == nil {
				sc, err = meshgraph.Parse(t, bytes.NewReader(body))
			}
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, err.Error())
				return
			}
			snap.Scrapes = append(snap.Scrapes, sc)
		}()
	}
	wg.Wait()
	// All scrapes share one timestamp: the rates divide by the time between
	// two rounds.
	snap.At = time.Now()
	sort.Strings(errs)
	return snap, errs
}

// targetOf names a proxy pod's role and workload (its Deployment or
// DaemonSet, as the metrics name workloads).
func targetOf(p *corev1.Pod) meshgraph.Target {
	role := p.Labels["app.kubernetes.io/component"]
	if role == "ingress-gateway" {
		role = "gateway"
	}
	return meshgraph.Target{Role: role, Namespace: p.Namespace, Pod: p.Name, Workload: workloadOf(p)}
}

// workloadOf is the pod's controller, a ReplicaSet named by its Deployment.
func workloadOf(p *corev1.Pod) string {
	for _, ref := range p.OwnerReferences {
		if ref.Controller == nil || !*ref.Controller {
			continue
		}
		if ref.Kind == "ReplicaSet" {
			if h := p.Labels["pod-template-hash"]; h != "" {
				return strings.TrimSuffix(ref.Name, "-"+h)
			}
		}
		return ref.Name
	}
	return p.Name
}

func (s *kubeSource) Policies(ctx context.Context) (string, []meshgraph.Policy, []meshgraph.Workload, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	root := s.k.meshNamespace(ctx)
	var list unstructured.UnstructuredList
	list.SetGroupVersionKind(authzPolicyList)
	if err := s.k.c.List(ctx, &list); err != nil {
		if apimeta.IsNoMatchError(err) {
			return root, nil, nil, nil // no Istio security CRDs: no policies
		}
		return "", nil, nil, err
	}
	var policies []meshgraph.Policy
	namespaces := map[string]bool{}
	for _, u := range list.Items {
		policies = append(policies, policyOf(&u))
		namespaces[u.GetNamespace()] = true
	}
	var workloads []meshgraph.Workload
	for ns := range namespaces {
		var pods corev1.PodList
		if err := s.k.c.List(ctx, &pods, client.InNamespace(ns)); err != nil {
			return "", nil, nil, err
		}
		seen := map[string]bool{}
		for i := range pods.Items {
			p := &pods.Items[i]
			if w := workloadOf(p); !seen[w] {
				seen[w] = true
				workloads = append(workloads, meshgraph.Workload{Namespace: ns, Name: w, Labels: p.Labels})
			}
		}
	}
	return root, policies, workloads, nil
}

// policyOf reads the selector and targetRefs of an AuthorizationPolicy.
func policyOf(u *unstructured.Unstructured) meshgraph.Policy {
	p := meshgraph.Policy{Namespace: u.GetNamespace(), Name: u.GetName()}
	p.Action, _, _ = unstructured.NestedString(u.Object, "spec", "action")
	p.Selector, _, _ = unstructured.NestedStringMap(u.Object, "spec", "selector", "matchLabels")
	var refs []any
	if r, ok, _ := unstructured.NestedMap(u.Object, "spec", "targetRef"); ok {
		refs = append(refs, r)
	}
	if rs, ok, _ := unstructured.NestedSlice(u.Object, "spec", "targetRefs"); ok {
		refs = append(refs, rs...)
	}
	for _, r := range refs {
		m, _ := r.(map[string]any)
		kind, _ := m["kind"].(string)
		name, _ := m["name"].(string)
		p.TargetRefs = append(p.TargetRefs, meshgraph.Ref{Kind: kind, Name: name})
	}
	return p
}

func (s *kubeSource) PolicyYAML(ctx context.Context, namespace, name string) ([]byte, error) {
	var u unstructured.Unstructured
	u.SetGroupVersionKind(authzPolicyList.GroupVersion().WithKind("AuthorizationPolicy"))
	if err := s.k.c.Get(ctx, client.ObjectKey{Namespace: namespace, Name: name}, &u); err != nil {
		return nil, err
	}
	unstructured.RemoveNestedField(u.Object, "metadata", "managedFields")
	return yaml.Marshal(u.Object)
}
