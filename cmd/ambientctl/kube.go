package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/client-go/kubernetes"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/portforward"
	"k8s.io/client-go/transport/spdy"
	"sigs.k8s.io/controller-runtime/pkg/client"

	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
)

const defaultMeshNamespace = "ambient-system"

// kube bundles the clients a command needs.
type kube struct {
	cfg       *rest.Config
	cs        kubernetes.Interface
	c         client.Client
	namespace string // the -n flag or the kubeconfig's namespace
	opts      options
}

// newConfigFlags registers kubectl's connection flags on fs. kubectl's -s
// shorthand of --server is taken by --for-service-account, so --server is
// registered without it; --cache-dir is left out: nothing here uses
// kubectl's discovery cache, and a flag that does nothing misleads.
func newConfigFlags(fs *pflag.FlagSet) *genericclioptions.ConfigFlags {
	cf := genericclioptions.NewConfigFlags(true)
	server := cf.APIServer
	cf.APIServer, cf.CacheDir = nil, nil
	cf.AddFlags(fs)
	cf.APIServer = server
	fs.StringVar(cf.APIServer, "server", "", "The address and port of the Kubernetes API server")
	return cf
}

// flagNamespace is the -n flag ("" when not given).
func (o options) flagNamespace() string {
	if o.kube == nil || o.kube.Namespace == nil {
		return ""
	}
	return *o.kube.Namespace
}

func newKube(o options) (*kube, error) {
	if o.kube == nil {
		o.kube = newConfigFlags(pflag.NewFlagSet("kube", pflag.ContinueOnError))
	}
	cfg, err := o.kube.ToRESTConfig()
	if err != nil {
		return nil, fmt.Errorf("loading kubeconfig: %w", err)
	}
	cfg.UserAgent = "ambientctl/" + version
	// -n, else the kubeconfig context's namespace, else default: as kubectl.
	ns, _, err := o.kube.ToRawKubeConfigLoader().Namespace()
	if err != nil || ns == "" {
		ns = "default"
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		return nil, err
	}
	if err := meshv1.AddToScheme(scheme); err != nil {
		return nil, err
	}
	if err := gwv1.Install(scheme); err != nil {
		return nil, err
	}
	c, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		return nil, err
	}
	return &kube{cfg: cfg, cs: cs, c: c, namespace: ns, opts: o}, nil
}

// meshNamespace is --mesh-namespace, else the AmbientMesh's namespace, else
// the default.
func (k *kube) meshNamespace(ctx context.Context) string {
	if k.opts.meshNamespace != "" {
		return k.opts.meshNamespace
	}
	var meshes meshv1.AmbientMeshList
	if err := k.c.List(ctx, &meshes); err == nil && len(meshes.Items) > 0 && meshes.Items[0].Spec.Namespace != "" {
		return meshes.Items[0].Spec.Namespace
	}
	return defaultMeshNamespace
}

// firstZtunnel returns the first running ztunnel pod of the mesh namespace.
func (k *kube) firstZtunnel(ctx context.Context, ns string) (string, error) {
	pods, err := k.cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app=ztunnel"})
	if err != nil {
		return "", err
	}
	var names []string
	for _, p := range pods.Items {
		if p.Status.Phase == corev1.PodRunning {
			names = append(names, p.Name)
		}
	}
	if len(names) == 0 {
		return "", fmt.Errorf("no running ztunnel pod (label app=ztunnel) in namespace %s; is the mesh installed? (ambientctl status)", ns)
	}
	sort.Strings(names)
	return names[0], nil
}

// adminGet fetches path from a pod's admin port through a port-forward (the
// admin endpoint listens on the pod's loopback only). When the port-forward
// cannot be set up it falls back to the API server's pod proxy, which works
// for proxies that listen on the pod IP.
func (k *kube) adminGet(ctx context.Context, ns, pod, path string) ([]byte, error) {
	return k.podGet(ctx, ns, pod, k.opts.adminPort, path)
}

// podGet fetches path from a pod's port, as adminGet does.
func (k *kube) podGet(ctx context.Context, ns, pod string, port int, path string) ([]byte, error) {
	body, pfErr := k.getPortForward(ctx, ns, pod, port, path)
	if pfErr == nil {
		return body, nil
	}
	body, proxyErr := k.cs.CoreV1().Pods(ns).ProxyGet("http", pod, strconv.Itoa(port), path, nil).DoRaw(ctx)
	if proxyErr == nil {
		return body, nil
	}
	return nil, fmt.Errorf("reading %s%s of pod %s/%s: port-forward: %v; pod proxy: %v", adminHost(port), path, ns, pod, pfErr, proxyErr)
}

func adminHost(port int) string { return "localhost:" + strconv.Itoa(port) }

func (k *kube) getPortForward(ctx context.Context, ns, pod string, port int, path string) ([]byte, error) {
	req := k.cs.CoreV1().RESTClient().Post().Resource("pods").Namespace(ns).Name(pod).SubResource("portforward")
	transport, upgrader, err := spdy.RoundTripperFor(k.cfg)
	if err != nil {
		return nil, err
	}
	dialer := spdy.NewDialer(upgrader, &http.Client{Transport: transport}, http.MethodPost, req.URL())
	stop, ready := make(chan struct{}), make(chan struct{})
	defer close(stop)
	var errOut strings.Builder
	fw, err := portforward.NewOnAddresses(dialer, []string{"127.0.0.1"}, []string{"0:" + strconv.Itoa(port)}, stop, ready, io.Discard, &errOut)
	if err != nil {
		return nil, err
	}
	done := make(chan error, 1)
	go func() { done <- fw.ForwardPorts() }()
	select {
	case <-ready:
	case err := <-done:
		return nil, fmt.Errorf("port-forward: %v %s", err, errOut.String())
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	ports, err := fw.GetPorts()
	if err != nil || len(ports) == 0 {
		return nil, fmt.Errorf("port-forward has no local port: %v", err)
	}
	u := url.URL{Scheme: "http", Host: "127.0.0.1:" + strconv.Itoa(int(ports[0].Local)), Path: path}
	hreq, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, err
	}
	resp, err := (&http.Client{Timeout: 20 * time.Second}).Do(hreq)
	if err != nil {
		return nil, fmt.Errorf("%v %s", err, strings.TrimSpace(errOut.String()))
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", path, resp.Status)
	}
	return body, nil
}
