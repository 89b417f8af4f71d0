package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
	admissionv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	"sigs.k8s.io/yaml"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
)

// TestManagerRun starts the real manager (run) against a real API server,
// with the self-signed webhook certificate path production uses, and
// checks the certificate is issued, injected and served, and that the
// controllers reconcile with the flag defaults.
func TestManagerRun(t *testing.T) {
	ctrl.SetLogger(logr.Discard())
	cfg, kcPath, k8s := startCluster(t)
	t.Setenv("KUBECONFIG", kcPath)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "ambient-system"}}); err != nil {
		t.Fatal(err)
	}
	vwc, mwc := installWebhookConfigs(t, k8s)

	port, metricsPort := freePort(t), freePort(t)
	c := &config{
		metricsAddr: fmt.Sprintf("127.0.0.1:%d", metricsPort), metricsSecure: true, probeAddr: "0", operatorNamespace: "ambient-system", imageRegistry: "ambient",
		ztunnelImage: "ambient/ztunnel:dev", nodeAgentImage: "ambient/ambient-cni:dev", waypointImage: "ambient/waypoint:dev",
		enableWebhooks: true, webhookPort: port, webhookCertDir: t.TempDir(), webhookSelfSigned: true,
		webhookService: "ambient-webhook-service", webhookConfigName: vwc.Name, injectorConfigName: mwc.Name, webhookSecret: "ambient-webhook-server-cert",
		managerPodLabelSelector: "app.kubernetes.io/name=ambient-manager", logLevel: "error",
	}
	done := make(chan error, 1)
	go func() { done <- run(ctx, c) }()

	// The certificate is issued into the Secret and its CA injected.
	secret := &corev1.Secret{}
	waitFor(t, "webhook cert Secret and caBundle", func() error {
		if err := k8s.Get(ctx, client.ObjectKey{Namespace: "ambient-system", Name: c.webhookSecret}, secret); err != nil {
			return err
		}
		got := &admissionv1.ValidatingWebhookConfiguration{}
		if err := k8s.Get(ctx, client.ObjectKey{Name: vwc.Name}, got); err != nil {
			return err
		}
		for _, w := range got.Webhooks {
			if string(w.ClientConfig.CABundle) != string(secret.Data["ca.crt"]) {
				return fmt.Errorf("caBundle of %s not injected", w.Name)
			}
		}
		gotM := &admissionv1.MutatingWebhookConfiguration{}
		if err := k8s.Get(ctx, client.ObjectKey{Name: mwc.Name}, gotM); err != nil {
			return err
		}
		for _, w := range gotM.Webhooks {
			if string(w.ClientConfig.CABundle) != string(secret.Data["ca.crt"]) {
				return fmt.Errorf("caBundle of %s not injected", w.Name)
			}
		}
		return nil
	})
	// The webhook server serves that certificate for the Service's DNS name.
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(secret.Data["ca.crt"])
	waitFor(t, "webhook TLS", func() error {
		conn, err := tls.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port), &tls.Config{RootCAs: roots, ServerName: "ambient-webhook-service.ambient-system.svc"})
		if err != nil {
			return err
		}
		return conn.Close()
	})

	// Controllers run with the flag defaults.
	if err := k8s.Create(ctx, &meshv1.AmbientMesh{ObjectMeta: metav1.ObjectMeta{Name: "default"}}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "ztunnel DaemonSet with the default image", func() error {
		ds := &appsv1.DaemonSet{}
		if err := k8s.Get(ctx, client.ObjectKey{Namespace: "ambient-system", Name: "ztunnel"}, ds); err != nil {
			return err
		}
		if img := ds.Spec.Template.Spec.Containers[0].Image; img != "ambient/ztunnel:dev" {
			return fmt.Errorf("image %s", img)
		}
		return nil
	})
	checkSecureMetrics(t, ctx, k8s, cfg, fmt.Sprintf("127.0.0.1:%d", metricsPort))
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("manager exited with %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("manager did not stop")
	}
}

// checkSecureMetrics: metrics are served over HTTPS only, to callers bound
// to config/rbac's metrics reader role, and refused to everyone else.
func checkSecureMetrics(t *testing.T, ctx context.Context, k8s client.Client, cfg *rest.Config, addr string) {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join("..", "..", "config", "rbac", "metrics_reader_role.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	role := &rbacv1.ClusterRole{}
	if err := yaml.Unmarshal(raw, role); err != nil {
		t.Fatal(err)
	}
	for _, o := range []client.Object{
		role,
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "prometheus", Namespace: "ambient-system"}},
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "someone", Namespace: "ambient-system"}},
		&rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "prometheus-metrics"},
			RoleRef:  rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: role.Name},
			Subjects: []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Namespace: "ambient-system", Name: "prometheus"}}},
	} {
		if err := k8s.Create(ctx, o); err != nil {
			t.Fatal(err)
		}
	}
	cs := kubernetes.NewForConfigOrDie(cfg)
	token := func(sa string) string {
		tr, err := cs.CoreV1().ServiceAccounts("ambient-system").CreateToken(ctx, sa, &authnv1.TokenRequest{}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return tr.Status.Token
	}
	// Self-signed serving certificate, as kube-controller-manager's metrics.
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	get := func(scheme, bearer string) (int, string, error) {
		req, _ := http.NewRequest("GET", scheme+"://"+addr+"/metrics", nil)
		if bearer != "" {
			req.Header.Set("Authorization", "Bearer "+bearer)
		}
		resp, err := hc.Do(req)
		if err != nil {
			return 0, "", err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), nil
	}
	prometheus := token("prometheus")
	waitFor(t, "metrics for the bound reader", func() error {
		code, body, err := get("https", prometheus)
		if err != nil || code != http.StatusOK || !strings.Contains(body, "controller_runtime_reconcile_total") {
			return fmt.Errorf("%d %v %.100q", code, err, body)
		}
		return nil
	})
	for _, c := range []struct {
		name, scheme, bearer string
		want                 int
	}{
		{"no token", "https", "", http.StatusUnauthorized},
		{"a forged token", "https", "not-a-token", http.StatusUnauthorized},
		{"an account without the role", "https", token("someone"), http.StatusForbidden},
		{"plain HTTP", "http", prometheus, http.StatusBadRequest}, // Go's TLS server answers plaintext with 400
	} {
		code, body, err := get(c.scheme, c.bearer)
		if err != nil || code != c.want || strings.Contains(body, "controller_runtime") {
			t.Errorf("%s: %d %v %.100q, want %d without metrics", c.name, code, err, body, c.want)
		}
	}
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func waitFor(t *testing.T, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	var err error
	for time.Now().Before(deadline) {
		if err = cond(); err == nil {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s: %v", what, err)
}

// startCluster starts a real API server (stopped with the test) and
// returns its config, a kubeconfig file for an admin and a client.
func startCluster(t *testing.T) (*rest.Config, string, client.Client) {
	t.Helper()
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		t.Fatal("KUBEBUILDER_ASSETS is not set: run 'make envtest' (make test sets it)")
	}
	env := &envtest.Environment{CRDDirectoryPaths: []string{filepath.Join("..", "..", "config", "crd", "bases")}, ErrorIfCRDPathMissing: true}
	t.Cleanup(func() { _ = env.Stop() }) // also after a half-failed Start
	cfg, err := env.Start()
	if err != nil {
		t.Fatal(err)
	}
	user, err := env.AddUser(envtest.User{Name: "admin", Groups: []string{"system:masters"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	kc, _ := user.KubeConfig()
	kcPath := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(kcPath, kc, 0o600); err != nil {
		t.Fatal(err)
	}
	scheme := runtime.NewScheme()
	_ = clientgoscheme.AddToScheme(scheme)
	_ = meshv1.AddToScheme(scheme)
	k8s, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		t.Fatal(err)
	}
	return cfg, kcPath, k8s
}

// installWebhookConfigs creates the webhook configurations as
// config/default installs them (no caBundle yet), unreachable from
// envtest's API server: admission keeps working meanwhile.
func installWebhookConfigs(t *testing.T, k8s client.Client) (*admissionv1.ValidatingWebhookConfiguration, *admissionv1.MutatingWebhookConfiguration) {
	t.Helper()
	vwc := &admissionv1.ValidatingWebhookConfiguration{}
	installWebhookConfig(t, k8s, "manifests.yaml", "ambient-validating-webhook-configuration", vwc, func() (out []webhookRef) {
		for i := range vwc.Webhooks {
			out = append(out, webhookRef{&vwc.Webhooks[i].ClientConfig, &vwc.Webhooks[i].FailurePolicy})
		}
		return out
	})
	mwc := &admissionv1.MutatingWebhookConfiguration{}
	installWebhookConfig(t, k8s, "sidecar_injector.yaml", "ambient-sidecar-injector", mwc, func() (out []webhookRef) {
		for i := range mwc.Webhooks {
			out = append(out, webhookRef{&mwc.Webhooks[i].ClientConfig, &mwc.Webhooks[i].FailurePolicy})
		}
		return out
	})
	return vwc, mwc
}

type webhookRef struct {
	cc     *admissionv1.WebhookClientConfig
	policy **admissionv1.FailurePolicyType
}

// installWebhookConfig creates config/webhook/<file> as name, pointing at
// the operator's Service, failing open.
func installWebhookConfig(t *testing.T, k8s client.Client, file, name string, obj client.Object, hooks func() []webhookRef) {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join("..", "..", "config", "webhook", file))
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(raw, obj); err != nil {
		t.Fatal(err)
	}
	obj.SetName(name)
	for _, h := range hooks() {
		h.cc.Service.Namespace = "ambient-system"
		h.cc.Service.Name = "ambient-webhook-service"
		ignore := admissionv1.Ignore
		*h.policy = &ignore
	}
	if err := k8s.Create(context.Background(), obj); err != nil {
		t.Fatal(err)
	}
}
