package httpauth

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
)

// A real kube-apiserver answers every TokenReview and SubjectAccessReview.
var (
	cfg *rest.Config
	k8s client.Client
	cs  *kubernetes.Clientset
)

const ns = "httpauth"

func TestMain(m *testing.M) {
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		if _, err := os.Stat("../../bin/k8s/1.36.3/kube-apiserver"); err == nil {
			abs, _ := filepath.Abs("../../bin/k8s/1.36.3")
			os.Setenv("KUBEBUILDER_ASSETS", abs)
		}
	}
	env := &envtest.Environment{}
	var err error
	if cfg, err = env.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "envtest:", err)
		os.Exit(1)
	}
	code := func() int {
		defer func() { _ = env.Stop() }()
		if k8s, err = client.New(cfg, client.Options{}); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		cs = kubernetes.NewForConfigOrDie(cfg)
		if err := setupRBAC(context.Background()); err != nil {
			fmt.Fprintln(os.Stderr, "rbac:", err)
			return 1
		}
		return m.Run()
	}()
	os.Exit(code)
}

// setupRBAC: "reader" may GET /metrics (as config/rbac's metrics reader
// role grants); "nobody" may nothing.
func setupRBAC(ctx context.Context) error {
	objs := []client.Object{
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}},
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "reader", Namespace: ns}},
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "nobody", Namespace: ns}},
		&rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: "metrics-reader"},
			Rules: []rbacv1.PolicyRule{{NonResourceURLs: []string{"/metrics"}, Verbs: []string{"get"}}}},
		readerBinding(),
	}
	for _, o := range objs {
		if err := k8s.Create(ctx, o); err != nil {
			return err
		}
	}
	return nil
}

func readerBinding() *rbacv1.ClusterRoleBinding {
	return &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "metrics-reader"},
		RoleRef:  rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "metrics-reader"},
		Subjects: []rbacv1.Subject{{Kind: "ServiceAccount", Name: "reader", Namespace: ns}}}
}

func token(t *testing.T, sa string, audiences ...string) string {
	t.Helper()
	tr, err := cs.CoreV1().ServiceAccounts(ns).CreateToken(context.Background(), sa,
		&authnv1.TokenRequest{Spec: authnv1.TokenRequestSpec{Audiences: audiences}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return tr.Status.Token
}

// serve puts a guarded handler behind a real HTTP server; the handler
// answers "secret" to whoever gets through.
func serve(t *testing.T, a *Authorizer) string {
	t.Helper()
	srv := httptest.NewServer(a.Handler(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, "secret")
	})))
	t.Cleanup(srv.Close)
	return srv.URL
}

func call(t *testing.T, method, url, authorization string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(method, url, nil)
	if authorization != "" {
		req.Header.Set("Authorization", authorization)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestHandler(t *testing.T) {
	url := serve(t, &Authorizer{Client: k8s})
	reader, nobody := token(t, "reader"), token(t, "nobody")
	for _, c := range []struct {
		name, method, path, auth string
		want                     int
	}{
		{"no token", "GET", "/metrics", "", 401},
		{"not a bearer token", "GET", "/metrics", "Basic cmVhZGVyOnB3", 401},
		{"empty bearer", "GET", "/metrics", "Bearer ", 401},
		{"forged token", "GET", "/metrics", "Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln", 401},
		{"reader may GET /metrics", "GET", "/metrics", "Bearer " + reader, 200},
		{"bearer is case-insensitive", "GET", "/metrics", "bearer " + reader, 200},
		{"reader may not POST /metrics", "POST", "/metrics", "Bearer " + reader, 403},
		{"reader may not read other URLs", "GET", "/debug/config_dump", "Bearer " + reader, 403},
		{"a user without RBAC", "GET", "/metrics", "Bearer " + nobody, 403},
	} {
		t.Run(c.name, func(t *testing.T) {
			code, body := call(t, c.method, url+c.path, c.auth)
			if code != c.want {
				t.Fatalf("%s %s: %d %q, want %d", c.method, c.path, code, body, c.want)
			}
			if (code == 200) != (body == "secret") {
				t.Fatalf("body %q with status %d", body, code)
			}
		})
	}
}

// TestAudience: a token minted for another audience (a proxy's token for
// the mesh) does not open the endpoint when audiences are required.
func TestAudience(t *testing.T) {
	url := serve(t, &Authorizer{Client: k8s, Audiences: []string{"ambient-operator"}})
	if code, _ := call(t, "GET", url+"/metrics", "Bearer "+token(t, "reader", "ambient-mesh")); code != 401 {
		t.Fatalf("wrong audience: %d, want 401", code)
	}
	if code, _ := call(t, "GET", url+"/metrics", "Bearer "+token(t, "reader", "ambient-operator")); code != 200 {
		t.Fatalf("right audience: %d, want 200", code)
	}
}

// TestRevocationAfterTTL: decisions are cached for CacheTTL only; a removed
// RoleBinding locks the caller out once it expires.
func TestRevocationAfterTTL(t *testing.T) {
	var mu sync.Mutex
	now := time.Now()
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }
	a := &Authorizer{Client: k8s, CacheTTL: time.Minute, now: clock}
	ctx := context.Background()
	tok := token(t, "reader")
	if d, user, err := a.Authorize(ctx, tok, "get", "/metrics"); err != nil || d != Allowed {
		t.Fatalf("before revocation: %v %v", d, err)
	} else if user != "system:serviceaccount:"+ns+":reader" {
		t.Fatalf("user %q", user)
	}
	if err := k8s.Delete(ctx, readerBinding()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = k8s.Create(ctx, readerBinding()) })
	if d, _, _ := a.Authorize(ctx, tok, "get", "/metrics"); d != Allowed {
		t.Fatalf("within the TTL the cached decision holds, got %v", d)
	}
	// The API server's RBAC cache may lag the delete by a moment.
	var d Decision
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		advance(2 * time.Minute)
		if d, _, _ = a.Authorize(ctx, tok, "get", "/metrics"); d == Forbidden {
			return
		}
	}
	t.Fatalf("after the TTL: %v, want Forbidden", d)
}

// TestAPIServerUnreachable: fail closed with 503, and do not cache it.
func TestAPIServerUnreachable(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := rest.CopyConfig(cfg)
	dead.Host = "https://" + ln.Addr().String()
	ln.Close()
	c, err := client.New(dead, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	a := &Authorizer{Client: c}
	url := serve(t, a)
	tok := token(t, "reader")
	if code, body := call(t, "GET", url+"/metrics", "Bearer "+tok); code != 503 || body == "secret" {
		t.Fatalf("unreachable API server: %d %q, want 503", code, body)
	}
	a.Client = k8s // back: the failure was not cached
	if code, _ := call(t, "GET", url+"/metrics", "Bearer "+tok); code != 200 {
		t.Fatalf("after recovery: %d, want 200", code)
	}
}

// TestCacheIsBounded: a flood of distinct tokens cannot grow memory without
// bound.
func TestCacheIsBounded(t *testing.T) {
	a := &Authorizer{}
	for i := range 3 * maxCacheEntries {
		a.store(cacheKey{path: fmt.Sprint(i)}, cached{decision: Unauthenticated})
	}
	if n := len(a.cache); n > maxCacheEntries {
		t.Fatalf("%d entries, want ≤ %d", n, maxCacheEntries)
	}
}
