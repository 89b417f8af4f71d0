package controllers

import (
	"context"
	"fmt"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

func l4Listener(name string, port gwv1.PortNumber, proto gwv1.ProtocolType, mode gwv1.TLSModeType) gwv1.Listener {
	all := gwv1.NamespacesFromAll
	l := gwv1.Listener{Name: gwv1.SectionName(name), Port: port, Protocol: proto,
		AllowedRoutes: &gwv1.AllowedRoutes{Namespaces: &gwv1.RouteNamespaces{From: &all}}}
	if mode != "" {
		l.TLS = &gwv1.ListenerTLSConfig{Mode: ptr.To(mode)}
		if mode == gwv1.TLSModeTerminate {
			l.TLS.CertificateRefs = []gwv1.SecretObjectReference{{Name: "some-cert"}}
		}
	}
	return l
}

func tlsRoute(ns, name string, parents []gwv1.ParentReference, host gwv1.Hostname, backends ...gwv1.BackendRef) *gwv1.TLSRoute {
	return &gwv1.TLSRoute{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: gwv1.TLSRouteSpec{CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: parents}, Hostnames: []gwv1.Hostname{host},
			Rules: []gwv1.TLSRouteRule{{BackendRefs: backends}}}}
}

func tcpRoute(ns, name string, parents []gwv1.ParentReference, backends ...gwv1.BackendRef) *gwv1.TCPRoute {
	return &gwv1.TCPRoute{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: gwv1.TCPRouteSpec{CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: parents},
			Rules: []gwv1.TCPRouteRule{{BackendRefs: backends}}}}
}

// TestIngressTLSPassthroughAndTCPStatus: TLS (Passthrough) and TCP
// listeners are served (Service ports, supportedKinds, attached route
// counts by kind), a TLS listener that would terminate is refused, and
// TLSRoutes/TCPRoutes get route status.parents from the same code as
// HTTPRoutes: accepted on their listeners, NotAllowedByListeners on a
// listener of another protocol, RefNotPermitted for an ungranted backend
// in another namespace, UnsupportedValue on a Service parent.
func TestIngressTLSPassthroughAndTCPStatus(t *testing.T) {
	ctx := context.Background()
	const ns, appNS = "ingress-l4", "ingress-l4-apps"
	createNamespace(t, ns)
	createNamespace(t, appNS)
	newMesh(t, "ingress-l4", "mesh-ingress-l4", nil)
	t.Cleanup(func() {
		_ = k8s.DeleteAllOf(ctx, &gwv1.Gateway{}, client.InNamespace(ns))
		_ = k8s.DeleteAllOf(ctx, &gwv1.TLSRoute{}, client.InNamespace(appNS))
		_ = k8s.DeleteAllOf(ctx, &gwv1.TCPRoute{}, client.InNamespace(appNS))
	})
	createService(t, appNS, "shop", nil)
	createService(t, appNS, "postgres", nil)
	gw := ingressGateway(ns, "edge",
		l4Listener("passthrough", 443, gwv1.TLSProtocolType, gwv1.TLSModePassthrough),
		l4Listener("db", 5432, gwv1.TCPProtocolType, ""),
		l4Listener("web", 80, gwv1.HTTPProtocolType, ""),
		l4Listener("tls-terminate", 8443, gwv1.TLSProtocolType, gwv1.TLSModeTerminate),
	)
	if err := k8s.Create(ctx, gw); err != nil {
		t.Fatal(err)
	}
	parent := func(section string) []gwv1.ParentReference {
		p := gwv1.ParentReference{Name: "edge", Namespace: ptr.To(gwv1.Namespace(ns))}
		if section != "" {
			p.SectionName = ptr.To(gwv1.SectionName(section))
		}
		return []gwv1.ParentReference{p}
	}
	shop := tlsRoute(appNS, "shop", parent(""), "shop.example.com", backend("", "shop"))
	db := tcpRoute(appNS, "db", parent("db"), backend("", "postgres"))
	onHTTP := tcpRoute(appNS, "on-http", parent("web"), backend("", "postgres"))
	remote := tcpRoute(appNS, "remote", parent("db"), backend("elsewhere", "postgres"))
	onService := tlsRoute(appNS, "on-service", []gwv1.ParentReference{serviceParent("", "shop")}, "shop.example.com", backend("", "shop"))
	for _, o := range []client.Object{shop, db, onHTTP, remote, onService} {
		if err := k8s.Create(ctx, o); err != nil {
			t.Fatalf("create %s: %v", o.GetName(), err)
		}
	}
	waitRouteParents(t, shop, map[string][]wantCond{"edge": {acceptedOK, resolvedOK}})
	waitRouteParents(t, db, map[string][]wantCond{"edge": {acceptedOK, resolvedOK}})
	waitRouteParents(t, onHTTP, map[string][]wantCond{"edge": {notListeners, resolvedOK}})
	waitRouteParents(t, remote, map[string][]wantCond{"edge": {acceptedOK, "ResolvedRefs=False/RefNotPermitted"}})
	waitRouteParents(t, onService, map[string][]wantCond{"shop": {"Accepted=False/UnsupportedValue", resolvedOK}})

	// db has two TCPRoutes (db, remote); passthrough one TLSRoute (shop);
	// web none: a TCPRoute naming it does not count.
	waitListener(t, ns, "edge", "passthrough", 1, "Accepted=True/Accepted", "Programmed=False/")
	waitListener(t, ns, "edge", "db", 2, "Accepted=True/Accepted")
	waitListener(t, ns, "edge", "web", 0, "Accepted=True/Accepted")
	gw = waitListener(t, ns, "edge", "tls-terminate", 0, "Accepted=False/UnsupportedValue")
	kinds := map[gwv1.SectionName][]gwv1.Kind{}
	for _, l := range gw.Status.Listeners {
		for _, k := range l.SupportedKinds {
			kinds[l.Name] = append(kinds[l.Name], k.Kind)
		}
	}
	for name, want := range map[gwv1.SectionName][]gwv1.Kind{
		"passthrough": {"TLSRoute"}, "db": {"TCPRoute"}, "web": {"HTTPRoute", "GRPCRoute"}, "tls-terminate": nil,
	} {
		if !slices.Equal(kinds[name], want) {
			t.Errorf("listener %s supportedKinds %v, want %v", name, kinds[name], want)
		}
	}
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "edge-istio"}}
	eventually(t, "gateway service", exists(svc))
	var ports []string
	for _, p := range svc.Spec.Ports {
		ports = append(ports, fmt.Sprintf("%s:%d:%s", p.Name, p.Port, ptr.Deref(p.AppProtocol, "")))
	}
	if want := "[http-80:80:http tls-443:443:tls tcp-5432:5432:tcp status-port:15021:]"; fmt.Sprint(ports) != want {
		t.Errorf("service ports %v, want %s", ports, want)
	}
}
