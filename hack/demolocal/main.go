// Command demolocal is `make demo-local`: the operator against a real local
// control plane (kube-apiserver + etcd from the envtest binaries), no
// cluster needed. It applies the sample AmbientMesh and a WaypointPolicy,
// shows what the operator produced and its status, and shows the API
// refusing invalid input. There are no nodes, so DaemonSets schedule
// nothing and the mesh honestly reports ComponentsNotReady.
package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"sigs.k8s.io/controller-runtime/pkg/envtest"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "demo-local:", err)
		os.Exit(1)
	}
}

func step(format string, args ...any) {
	fmt.Printf("\n\033[1m==> %s\033[0m\n", fmt.Sprintf(format, args...))
}

func run() error {
	root, err := os.Getwd()
	if err != nil {
		return err
	}
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		return fmt.Errorf("KUBEBUILDER_ASSETS is not set: run via 'make demo-local'")
	}
	work := filepath.Join(root, "bin", "demo")
	if err := os.MkdirAll(work, 0o755); err != nil {
		return err
	}

	step("starting a local control plane (kube-apiserver + etcd from %s)", os.Getenv("KUBEBUILDER_ASSETS"))
	env := &envtest.Environment{
		CRDDirectoryPaths:     []string{filepath.Join(root, "config", "crd", "bases")},
		ErrorIfCRDPathMissing: true,
		WebhookInstallOptions: envtest.WebhookInstallOptions{Paths: []string{filepath.Join(root, "config", "webhook", "manifests.yaml")}},
	}
	defer func() {
		step("stopping the local control plane")
		_ = env.Stop()
	}()
	if _, err := env.Start(); err != nil {
		return err
	}
	user, err := env.AddUser(envtest.User{Name: "demo-admin", Groups: []string{"system:masters"}}, nil)
	if err != nil {
		return err
	}
	kubeconfig, err := user.KubeConfig()
	if err != nil {
		return err
	}
	kcPath := filepath.Join(work, "kubeconfig")
	if err := os.WriteFile(kcPath, kubeconfig, 0o600); err != nil {
		return err
	}
	fmt.Printf("API server %s; kubeconfig %s\n", env.Config.Host, kcPath)

	step("starting the operator (bin/manager)")
	wo := env.WebhookInstallOptions
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	logFile, err := os.Create(filepath.Join(work, "manager.log"))
	if err != nil {
		return err
	}
	defer logFile.Close()
	mgr := exec.CommandContext(ctx, filepath.Join(root, "bin", "manager"),
		"--operator-namespace=ambient-system",
		"--metrics-bind-address=0", "--health-probe-bind-address=0",
		"--webhook-self-signed=false", "--webhook-cert-dir="+wo.LocalServingCertDir,
		fmt.Sprintf("--webhook-port=%d", wo.LocalServingPort),
		fmt.Sprintf("--controlplane=%v", os.Getenv("DEMO_CONTROLPLANE") == "1"),
		"--log-development")
	mgr.Env = append(os.Environ(), "KUBECONFIG="+kcPath)
	mgr.Stdout, mgr.Stderr = logFile, logFile
	if err := mgr.Start(); err != nil {
		return err
	}
	defer func() { _ = mgr.Process.Signal(syscall.SIGTERM); _ = mgr.Wait() }()
	fmt.Printf("manager pid %d, log %s\n", mgr.Process.Pid, logFile.Name())

	k := kubectl{kubeconfig: kcPath, root: root}
	if err := k.waitWebhook(ctx); err != nil {
		return err
	}

	step("kubectl apply -f config/samples/mesh_v1alpha1_ambientmesh.yaml")
	k.show("apply", "-f", "config/samples/mesh_v1alpha1_ambientmesh.yaml")
	k.waitFor(ctx, "jsonpath={.status.conditions[?(@.type==\"CAReady\")].status}", "True", "ambientmesh", "default")

	step("the mesh (printer columns) and its conditions")
	k.show("get", "ambientmesh")
	k.show("get", "ambientmesh", "default", "-o", `jsonpath={range .status.conditions[*]}{.type}{"\t"}{.status}{"\t"}{.reason}{"\t"}{.message}{"\n"}{end}`)
	fmt.Println("(no kubelet here: the DaemonSets schedule no pods, so ztunnel and the node agent are not ready)")

	step("what the operator created in ambient-system")
	k.show("get", "daemonsets,services,serviceaccounts,configmaps,secrets", "-n", "ambient-system", "-l", "app.kubernetes.io/managed-by=ambient-operator")
	k.show("get", "clusterroles,clusterrolebindings", "-l", "app.kubernetes.io/managed-by=ambient-operator")

	step("the trust bundle is published into every namespace")
	k.show("create", "namespace", "bookinfo")
	time.Sleep(time.Second)
	k.show("get", "configmaps", "-A", "--field-selector", "metadata.name=ambient-root-cert")

	step("a waypoint for namespace bookinfo: kubectl apply -f config/samples/mesh_v1alpha1_waypointpolicy.yaml")
	k.show("apply", "-f", "config/samples/mesh_v1alpha1_waypointpolicy.yaml")
	k.waitFor(ctx, "jsonpath={.status.address}", "", "waypointpolicy", "waypoint", "-n", "bookinfo")
	k.show("get", "waypointpolicies,deployments,services,serviceaccounts", "-n", "bookinfo", "-l", "gateway.istio.io/managed=istio.io-mesh-controller")
	k.show("get", "waypointpolicy", "-n", "bookinfo")

	step("the API refuses what cannot work, saying which field and how to fix it")
	k.show("patch", "ambientmesh", "default", "--type=merge", "-p", `{"spec":{"trustDomain":"other.example"}}`)
	k.showStdin("apply", "-f", "-", "apiVersion: mesh.ambient.dev/v1alpha1\nkind: AmbientMesh\nmetadata: {name: second}\n")
	k.showStdin("apply", "-f", "-", "apiVersion: mesh.ambient.dev/v1alpha1\nkind: WaypointPolicy\nmetadata: {name: another, namespace: bookinfo}\nspec: {scope: Namespace}\n")

	step("deleting the mesh removes everything it created")
	k.show("delete", "ambientmesh", "default", "--wait=true", "--timeout=60s")
	k.show("get", "daemonsets,configmaps,secrets", "-A", "-l", "app.kubernetes.io/managed-by=ambient-operator")

	if os.Getenv("DEMO_KEEP") == "1" {
		step("DEMO_KEEP=1: control plane stays up; export KUBECONFIG=%s; Ctrl-C to stop", kcPath)
		<-ctx.Done()
	}
	return nil
}

type kubectl struct{ kubeconfig, root string }

func (k kubectl) cmd(args ...string) *exec.Cmd {
	c := exec.Command("kubectl", append([]string{"--kubeconfig", k.kubeconfig}, args...)...)
	c.Dir = k.root
	return c
}

// show runs kubectl and prints its output (errors included: some steps
// demonstrate refusals).
func (k kubectl) show(args ...string) {
	fmt.Printf("$ kubectl %s\n", strings.Join(args, " "))
	out, _ := k.cmd(args...).CombinedOutput()
	fmt.Print(indent(string(out)))
}

func (k kubectl) showStdin(args ...string) {
	stdin := args[len(args)-1]
	args = args[:len(args)-1]
	fmt.Printf("$ kubectl %s <<EOF\n%sEOF\n", strings.Join(args, " "), indent(stdin))
	c := k.cmd(args...)
	c.Stdin = strings.NewReader(stdin)
	out, _ := c.CombinedOutput()
	fmt.Print(indent(string(out)))
}

func indent(s string) string {
	if s == "" {
		return ""
	}
	return "    " + strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n    ") + "\n"
}

// waitFor polls a jsonpath until it equals want (or is non-empty when want is "").
func (k kubectl) waitFor(ctx context.Context, jsonpath, want string, args ...string) {
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		out, err := k.cmd(append([]string{"get"}, append(args, "-o", jsonpath)...)...).Output()
		got := strings.TrimSpace(string(out))
		if err == nil && ((want == "" && got != "") || (want != "" && got == want)) {
			return
		}
		time.Sleep(300 * time.Millisecond)
	}
	fmt.Printf("(timed out waiting for %s %s)\n", strings.Join(args, " "), jsonpath)
}

// waitWebhook waits until the manager's webhook answers (a dry-run create
// goes through it).
func (k kubectl) waitWebhook(ctx context.Context) error {
	deadline := time.Now().Add(90 * time.Second)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		c := k.cmd("apply", "--dry-run=server", "-f", "config/samples/mesh_v1alpha1_ambientmesh.yaml")
		if err := c.Run(); err == nil {
			return nil
		}
		time.Sleep(500 * time.Millisecond)
	}
	return fmt.Errorf("the operator did not become ready; see bin/demo/manager.log")
}
