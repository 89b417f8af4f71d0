package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/go-logr/logr"
	admissionv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
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
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		t.Fatal("KUBEBUILDER_ASSETS is not set: run 'make envtest' (make test sets it)")
	}
	ctrl.SetLogger(logr.Discard())
	env := &envtest.Environment{CRDDirectoryPaths: []string{filepath.Join("..", "..", "config", "crd", "bases")}, ErrorIfCRDPathMissing: true}
	defer func() { _ = env.Stop() }() // also after a half-failed Start
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
	t.Setenv("KUBECONFIG", kcPath)

	scheme := runtime.NewScheme()
	_ = clientgoscheme.AddToScheme(scheme)
	_ = meshv1.AddToScheme(scheme)
	k8s, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "ambient-system"}}); err != nil {
		t.Fatal(err)
	}
	// The webhook configuration as config/default installs it (no caBundle yet).
	raw, err := os.ReadFile(filepath.Join("..", "..", "config", "webhook", "manifests.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	vwc := &admissionv1.ValidatingWebhookConfiguration{}
	if err := yaml.Unmarshal(raw, vwc); err != nil {
		t.Fatal(err)
	}
	vwc.Name = "ambient-validating-webhook-configuration"
	for i := range vwc.Webhooks {
		vwc.Webhooks[i].ClientConfig.Service.Namespace = "ambient-system"
		vwc.Webhooks[i].ClientConfig.Service.Name = "ambient-webhook-service"
		// Unreachable from envtest's API server; keep admission working meanwhile.
		ignore := admissionv1.Ignore
		vwc.Webhooks[i].FailurePolicy = &ignore
	}
	if err := k8s.Create(ctx, vwc); err != nil {
		t.Fatal(err)
	}

	port := freePort(t)
	c := &config{
		metricsAddr: "0", probeAddr: "0", operatorNamespace: "ambient-system", imageRegistry: "ambient",
		ztunnelImage: "ambient/ztunnel:dev", nodeAgentImage: "ambient/ambient-cni:dev", waypointImage: "ambient/waypoint:dev",
		enableWebhooks: true, webhookPort: port, webhookCertDir: t.TempDir(), webhookSelfSigned: true,
		webhookService: "ambient-webhook-service", webhookConfigName: vwc.Name, webhookSecret: "ambient-webhook-server-cert",
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
