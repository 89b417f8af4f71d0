package controllers

import (
	"context"
	"fmt"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// seedsIngressGateway is the seeds' Gateway: class istio, HTTP on 80,
// routes from all namespaces; plus an HTTPS listener we do not serve yet.
func seedsIngressGateway(ns string) *gwv1.Gateway {
	all := gwv1.NamespacesFromAll
	return &gwv1.Gateway{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "gateway"},
		Spec: gwv1.GatewaySpec{
			GatewayClassName: IngressGatewayClass,
			Listeners: []gwv1.Listener{
				{Name: "http", Port: 80, Protocol: gwv1.HTTPProtocolType,
					AllowedRoutes: &gwv1.AllowedRoutes{Namespaces: &gwv1.RouteNamespaces{From: &all}}},
				{Name: "https", Port: 443, Protocol: gwv1.HTTPSProtocolType},
			},
		},
	}
}

func httpbinRoute(ns, gwNS string, section *gwv1.SectionName) *gwv1.HTTPRoute {
	return &gwv1.HTTPRoute{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "httpbin"},
		Spec: gwv1.HTTPRouteSpec{
			CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{{
				Name: "gateway", Namespace: ptr.To(gwv1.Namespace(gwNS)), SectionName: section,
			}}},
			Rules: []gwv1.HTTPRouteRule{{BackendRefs: []gwv1.HTTPBackendRef{{BackendRef: gwv1.BackendRef{
				BackendObjectReference: gwv1.BackendObjectReference{Name: "httpbin", Port: ptr.To(gwv1.PortNumber(8000))},
			}}}}},
		},
	}
}

// TestIngressGateway: the seeds' Gateway gets an ingress gateway (the L7
// proxy in ingress role) behind a LoadBalancer Service; status reports the
// load balancer's address, listeners and attached routes, and the route's
// parent status says it was accepted.
func TestIngressGateway(t *testing.T) {
	ctx := context.Background()
	const ns, appNS = "istio-ingress", "ingress-apps"
	createNamespace(t, ns)
	createNamespace(t, appNS)
	newMesh(t, "ingress", "mesh-ingress", nil)
	t.Cleanup(func() {
		_ = k8s.DeleteAllOf(ctx, &gwv1.Gateway{}, client.InNamespace(ns))
		_ = k8s.DeleteAllOf(ctx, &gwv1.HTTPRoute{}, client.InNamespace(appNS))
	})
	if err := k8s.Create(ctx, seedsIngressGateway(ns)); err != nil {
		t.Fatal(err)
	}
	// Named as Istio names them: the seeds read Service <gateway>-istio.
	dep := &appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "gateway-istio"}}
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "gateway-istio"}}
	eventually(t, "gateway deployment", exists(dep))
	eventually(t, "gateway service", exists(svc))

	c := dep.Spec.Template.Spec.Containers[0]
	env := envMap(c.Env)
	if env["PROXY_ROLE"] != "ingress" || env["WAYPOINT_NAME"] != "gateway" || env["ROOT_NAMESPACE"] != "mesh-ingress" {
		t.Errorf("env %v: want the ingress role of gateway in mesh-ingress", env)
	}
	var ports []int32
	for _, p := range c.Ports {
		ports = append(ports, p.ContainerPort)
		if p.ContainerPort == hbonePort {
			t.Errorf("the ingress gateway exposes HBONE port %d", hbonePort)
		}
	}
	if fmt.Sprint(ports) != "[15020 15021 80]" {
		t.Errorf("container ports %v, want metrics, status and the HTTP listener's 80 (not the unserved 443)", ports)
	}
	if sc := dep.Spec.Template.Spec.SecurityContext; sc == nil || len(sc.Sysctls) != 1 || sc.Sysctls[0].Name != "net.ipv4.ip_unprivileged_port_start" {
		t.Errorf("pod security context %+v: port 80 needs unprivileged binding", sc)
	}
	if caps := c.SecurityContext.Capabilities; caps == nil || len(caps.Add) != 0 || len(caps.Drop) != 1 {
		t.Errorf("capabilities %+v, want all dropped", caps)
	}
	if dep.Spec.Template.Labels[LabelDataplaneMode] != "none" || dep.Labels[LabelGatewayClassName] != IngressGatewayClass {
		t.Errorf("labels %v / %v", dep.Spec.Template.Labels, dep.Labels)
	}
	if svc.Spec.Type != corev1.ServiceTypeLoadBalancer || len(svc.Spec.Ports) != 2 || svc.Spec.Ports[0].Port != 80 {
		t.Errorf("service %s %+v, want LoadBalancer on 80 and the status port", svc.Spec.Type, svc.Spec.Ports)
	}
	if p := svc.Spec.IPFamilyPolicy; p == nil || *p != corev1.IPFamilyPolicyPreferDualStack {
		t.Errorf("service ipFamilyPolicy %q, want PreferDualStack (an address of each family on a dual-stack cluster, as Istio's)", ptr.Deref(p, ""))
	}

	// Ready replicas but no load balancer address yet: not programmed.
	if dep.Spec.Template.Spec.ServiceAccountName != "gateway-istio" {
		t.Errorf("service account %q, want gateway-istio", dep.Spec.Template.Spec.ServiceAccountName)
	}
	setDeploymentStatus(t, ns, "gateway-istio", 1)
	gw := &gwv1.Gateway{}
	eventually(t, "Programmed=False AddressNotAssigned", func() error {
		if err := k8s.Get(ctx, client.ObjectKey{Namespace: ns, Name: "gateway"}, gw); err != nil {
			return err
		}
		c := meta.FindStatusCondition(gw.Status.Conditions, string(gwv1.GatewayConditionProgrammed))
		if c == nil || c.Status != metav1.ConditionFalse || c.Reason != string(gwv1.GatewayReasonAddressNotAssigned) {
			return fmt.Errorf("Programmed %+v", c)
		}
		return nil
	})
	// The load balancer (MetalLB in the lab) assigns an address.
	eventually(t, "load balancer status", func() error {
		if err := k8s.Get(ctx, client.ObjectKeyFromObject(svc), svc); err != nil {
			return err
		}
		svc.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{IP: "10.201.0.240"}, {IP: "fd00:201::240"}}
		return k8s.Status().Update(ctx, svc)
	})
	gw = waitGatewayCondition(t, ns, "gateway", string(gwv1.GatewayConditionProgrammed), metav1.ConditionTrue)
	var addrs []string
	for _, a := range gw.Status.Addresses {
		addrs = append(addrs, a.Value)
	}
	if fmt.Sprint(addrs) != "[10.201.0.240 fd00:201::240]" {
		t.Errorf("addresses %v, want both of the load balancer's (10.201.0.240 fd00:201::240)", addrs)
	}

	// The seeds' route from another namespace attaches to the HTTP listener.
	if err := k8s.Create(ctx, httpbinRoute(appNS, ns, nil)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "attached routes", func() error {
		if err := k8s.Get(ctx, client.ObjectKeyFromObject(gw), gw); err != nil {
			return err
		}
		// https admits only its own namespace's routes.
		want := map[gwv1.SectionName]int32{"http": 1, "https": 0}
		for _, l := range gw.Status.Listeners {
			if l.AttachedRoutes != want[l.Name] {
				return fmt.Errorf("listener %s: %d routes", l.Name, l.AttachedRoutes)
			}
		}
		return nil
	})
	for _, l := range gw.Status.Listeners {
		accepted := meta.FindStatusCondition(l.Conditions, string(gwv1.ListenerConditionAccepted))
		switch l.Name {
		case "http":
			if accepted.Status != metav1.ConditionTrue || len(l.SupportedKinds) != 2 {
				t.Errorf("http listener %+v", l)
			}
		case "https":
			// Without certificates: a valid listener whose references do not
			// resolve, and not programmed.
			refs := meta.FindStatusCondition(l.Conditions, string(gwv1.ListenerConditionResolvedRefs))
			programmed := meta.FindStatusCondition(l.Conditions, string(gwv1.ListenerConditionProgrammed))
			if refs.Status != metav1.ConditionFalse || refs.Reason != string(gwv1.ListenerReasonInvalidCertificateRef) || programmed.Status != metav1.ConditionFalse {
				t.Errorf("https listener ResolvedRefs %+v Programmed %+v, want InvalidCertificateRef and not programmed", refs, programmed)
			}
		}
	}
	waitRouteParent(t, appNS, "httpbin", metav1.ConditionTrue, string(gwv1.RouteReasonAccepted))
}

// TestIngressRouteNotAllowed: a route from another namespace on a listener
// that admits only its own namespace is refused, and says why.
func TestIngressRouteNotAllowed(t *testing.T) {
	ctx := context.Background()
	const ns, appNS = "ingress-same", "ingress-same-apps"
	createNamespace(t, ns)
	createNamespace(t, appNS)
	newMesh(t, "ingress-same", "mesh-ingress-same", nil)
	gw := seedsIngressGateway(ns)
	gw.Spec.Listeners[0].AllowedRoutes = nil // Same namespace only
	t.Cleanup(func() {
		_ = k8s.DeleteAllOf(ctx, &gwv1.Gateway{}, client.InNamespace(ns))
		_ = k8s.DeleteAllOf(ctx, &gwv1.HTTPRoute{}, client.InNamespace(appNS))
	})
	if err := k8s.Create(ctx, gw); err != nil {
		t.Fatal(err)
	}
	if err := k8s.Create(ctx, httpbinRoute(appNS, ns, ptr.To(gwv1.SectionName("http")))); err != nil {
		t.Fatal(err)
	}
	waitRouteParent(t, appNS, "httpbin", metav1.ConditionFalse, string(gwv1.RouteReasonNotAllowedByListeners))

	// A selector admits the namespaces whose labels it matches, following
	// label changes.
	sel := gwv1.NamespacesFromSelector
	eventually(t, "listener selects namespaces by label", func() error {
		if err := k8s.Get(ctx, client.ObjectKeyFromObject(gw), gw); err != nil {
			return err
		}
		gw.Spec.Listeners[0].AllowedRoutes = &gwv1.AllowedRoutes{Namespaces: &gwv1.RouteNamespaces{From: &sel,
			Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"expose-to": "edge"}}}}
		return k8s.Update(ctx, gw)
	})
	waitRouteParent(t, appNS, "httpbin", metav1.ConditionFalse, string(gwv1.RouteReasonNotAllowedByListeners))
	nsObj := &corev1.Namespace{}
	eventually(t, "label the route's namespace", func() error {
		if err := k8s.Get(ctx, client.ObjectKey{Name: appNS}, nsObj); err != nil {
			return err
		}
		if nsObj.Labels == nil {
			nsObj.Labels = map[string]string{}
		}
		nsObj.Labels["expose-to"] = "edge"
		return k8s.Update(ctx, nsObj)
	})
	waitRouteParent(t, appNS, "httpbin", metav1.ConditionTrue, string(gwv1.RouteReasonAccepted))
	// A parentRef naming no listener is NoMatchingParent.
	if err := k8s.Delete(ctx, httpbinRoute(appNS, ns, nil)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "old route gone", gone(httpbinRoute(appNS, ns, nil)))
	if err := k8s.Create(ctx, httpbinRoute(appNS, ns, ptr.To(gwv1.SectionName("nope")))); err != nil {
		t.Fatal(err)
	}
	waitRouteParent(t, appNS, "httpbin", metav1.ConditionFalse, string(gwv1.RouteReasonNoMatchingParent))
}

func waitRouteParent(t *testing.T, ns, name string, status metav1.ConditionStatus, reason string) {
	t.Helper()
	eventually(t, fmt.Sprintf("route %s/%s Accepted=%s %s", ns, name, status, reason), func() error {
		r := &gwv1.HTTPRoute{}
		if err := k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: name}, r); err != nil {
			return err
		}
		for _, p := range r.Status.Parents {
			if p.ControllerName != WaypointControllerName {
				continue
			}
			c := meta.FindStatusCondition(p.Conditions, string(gwv1.RouteConditionAccepted))
			if c != nil && c.Status == status && c.Reason == reason {
				return nil
			}
		}
		return fmt.Errorf("parents %+v", r.Status.Parents)
	})
}

// TestIngressHTTPSListener: an HTTPS listener terminating TLS gets its
// Secret (holding a valid key pair) mounted read-only where the gateway
// reads certificates, an https Service port, and is accepted; one without
// certificates is refused with the reason.
func TestIngressHTTPSListener(t *testing.T) {
	ctx := context.Background()
	const ns = "ingress-tls"
	createNamespace(t, ns)
	newMesh(t, "ingress-tls", "mesh-ingress-tls", nil)
	crt, key := selfSigned(t, "shop.example.com")
	createTLSSecret(t, ns, "shop-cert", crt, key)
	gw := seedsIngressGateway(ns)
	gw.Spec.Listeners = append(gw.Spec.Listeners, gwv1.Listener{Name: "shop", Port: 8443, Protocol: gwv1.HTTPSProtocolType,
		Hostname: ptr.To(gwv1.Hostname("shop.example.com")),
		TLS:      &gwv1.ListenerTLSConfig{CertificateRefs: []gwv1.SecretObjectReference{{Name: "shop-cert"}}}})
	t.Cleanup(func() { _ = k8s.DeleteAllOf(ctx, &gwv1.Gateway{}, client.InNamespace(ns)) })
	if err := k8s.Create(ctx, gw); err != nil {
		t.Fatal(err)
	}
	dep := &appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "gateway-istio"}}
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "gateway-istio"}}
	eventually(t, "gateway deployment", exists(dep))
	eventually(t, "gateway service", exists(svc))
	pod := dep.Spec.Template.Spec
	var mounted bool
	for _, m := range pod.Containers[0].VolumeMounts {
		for _, v := range pod.Volumes {
			if v.Name == m.Name && v.Secret != nil && v.Secret.SecretName == "shop-cert" && m.MountPath == GatewayCertDir+"/shop-cert" && m.ReadOnly {
				mounted = true
			}
		}
	}
	if !mounted {
		t.Errorf("Secret shop-cert not mounted read-only at %s/shop-cert: volumes %+v mounts %+v", GatewayCertDir, pod.Volumes, pod.Containers[0].VolumeMounts)
	}
	if env := envMap(pod.Containers[0].Env); env["GATEWAY_CERT_DIR"] != GatewayCertDir {
		t.Errorf("GATEWAY_CERT_DIR %q", env["GATEWAY_CERT_DIR"])
	}
	var names []string
	for _, p := range svc.Spec.Ports {
		names = append(names, fmt.Sprintf("%s:%d", p.Name, p.Port))
	}
	if fmt.Sprint(names) != "[http-80 https-8443 status-port:15021]" && fmt.Sprint(names) != "[http-80:80 https-8443:8443 status-port:15021]" {
		t.Errorf("service ports %v", names)
	}
	eventually(t, "listener conditions", func() error {
		if err := k8s.Get(ctx, client.ObjectKeyFromObject(gw), gw); err != nil {
			return err
		}
		want := map[gwv1.SectionName]metav1.ConditionStatus{"http": "True", "shop": "True", "https": "False"}
		// The served listeners resolve their references; https has none.
		if len(gw.Status.Listeners) != len(want) {
			return fmt.Errorf("listeners %+v", gw.Status.Listeners)
		}
		for _, l := range gw.Status.Listeners {
			c := meta.FindStatusCondition(l.Conditions, string(gwv1.ListenerConditionResolvedRefs))
			if c == nil || c.Status != want[l.Name] {
				return fmt.Errorf("listener %s ResolvedRefs %+v, want %s", l.Name, c, want[l.Name])
			}
			if l.Name == "https" && !strings.Contains(c.Message, "certificateRefs") {
				return fmt.Errorf("https refused for %q, want the missing certificateRefs named", c.Message)
			}
		}
		return nil
	})
}

// TestServiceAddresses: a Gateway's status names every address of its
// Service clients use, of each family: the load balancer's, else the
// cluster IPs.
func TestServiceAddresses(t *testing.T) {
	cases := []struct {
		name string
		st   corev1.ServiceType
		svc  corev1.Service
		want string
	}{
		{"load balancer, both families", corev1.ServiceTypeLoadBalancer, corev1.Service{
			Spec:   corev1.ServiceSpec{ClusterIP: "10.96.0.5", ClusterIPs: []string{"10.96.0.5", "fd00:96::5"}},
			Status: corev1.ServiceStatus{LoadBalancer: corev1.LoadBalancerStatus{Ingress: []corev1.LoadBalancerIngress{{IP: "10.201.0.200"}, {IP: "fd00:201::200"}}}},
		}, "[10.201.0.200 fd00:201::200]"},
		{"load balancer by hostname", corev1.ServiceTypeLoadBalancer, corev1.Service{
			Status: corev1.ServiceStatus{LoadBalancer: corev1.LoadBalancerStatus{Ingress: []corev1.LoadBalancerIngress{{Hostname: "lb.example"}}}},
		}, "[lb.example]"},
		{"load balancer without an address yet", corev1.ServiceTypeLoadBalancer, corev1.Service{
			Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.5"},
		}, "[]"},
		{"cluster IPs of both families", corev1.ServiceTypeClusterIP, corev1.Service{
			Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.5", ClusterIPs: []string{"10.96.0.5", "fd00:96::5"}},
		}, "[10.96.0.5 fd00:96::5]"},
		{"cluster IP only (older objects)", corev1.ServiceTypeClusterIP, corev1.Service{
			Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.5"},
		}, "[10.96.0.5]"},
		{"headless", corev1.ServiceTypeClusterIP, corev1.Service{
			Spec: corev1.ServiceSpec{ClusterIP: corev1.ClusterIPNone, ClusterIPs: []string{corev1.ClusterIPNone}},
		}, "[]"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var got []string
			for _, a := range serviceAddresses(&tc.svc, tc.st) {
				got = append(got, a.Value)
			}
			if fmt.Sprint(got) != tc.want {
				t.Errorf("addresses %v, want %s", got, tc.want)
			}
		})
	}
}
