package controllers

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwv1beta1 "sigs.k8s.io/gateway-api/apis/v1beta1"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/controllers/waypointbind"
	"github.com/ambientmesh/ambient/proxylib/route"
)

// IngressGatewayClass is the built-in class of ingress Gateways, as Istio
// names it. Every other class naming our controllerName (but
// istio-waypoint) is an ingress class too: waypointbind.IngressClass.
const IngressGatewayClass = waypointbind.IngressGatewayClass

// AnnotationServiceType on a Gateway chooses its Service's type (Istio's
// annotation); default LoadBalancer.
const AnnotationServiceType = "networking.istio.io/service-type"

// Ingress is what makes a Waypoint an ingress gateway: the Gateway's
// listeners, the type of the Service that exposes them, the ports served
// and the certificate Secrets mounted.
type Ingress struct {
	Gateway     *gwv1.Gateway
	ServiceType corev1.ServiceType
	// Ports are the listener ports served; Certs the certificate Secrets
	// of their HTTPS listeners. IngressFromGateway plans without
	// ReferenceGrants or Secrets; the reconciler replaces both with its
	// plan (planListeners).
	Ports []route.Port
	Certs []CertMount
	// From the Gateway's parameters (GatewayParameters): the Service's
	// externalTrafficPolicy (Local keeps the client's address) and
	// annotations (e.g. a load balancer's address pool).
	ExternalTrafficPolicy corev1.ServiceExternalTrafficPolicy
	ServiceAnnotations    map[string]string
}

// IngressFromGateway reads an ingress Gateway (class istio, or another
// ingress class: the caller checks the class) into the L7 proxy the
// operator deploys for it.
func IngressFromGateway(gw *gwv1.Gateway, mesh *meshv1.AmbientMesh, d Defaults) (Waypoint, error) {
	if gw.Spec.GatewayClassName == WaypointGatewayClass {
		return Waypoint{}, fmt.Errorf("gateway %s/%s has class %q: a waypoint, not an ingress gateway", gw.Namespace, gw.Name, gw.Spec.GatewayClassName)
	}
	st := corev1.ServiceType(gw.Annotations[AnnotationServiceType])
	switch st {
	case "":
		st = corev1.ServiceTypeLoadBalancer
	case corev1.ServiceTypeLoadBalancer, corev1.ServiceTypeNodePort, corev1.ServiceTypeClusterIP:
	default:
		return Waypoint{}, fmt.Errorf("gateway %s/%s: annotation %s=%q must be LoadBalancer, NodePort or ClusterIP", gw.Namespace, gw.Name, AnnotationServiceType, st)
	}
	for _, l := range gw.Spec.Listeners {
		if l.Port == proxyReadinessPort || l.Port == proxyMetricsPort {
			return Waypoint{}, fmt.Errorf("gateway %s/%s: listener %s uses port %d, which the gateway keeps for its own status", gw.Namespace, gw.Name, l.Name, l.Port)
		}
	}
	ports, _ := route.Plan(gw, nil)
	var certs []CertMount
	for _, key := range route.CertificateSecrets(gw.Namespace, ports) {
		certs = append(certs, CertMount{Dir: route.CertificateDir(gw.Namespace, key), Secret: key.Name})
	}
	w := Waypoint{
		Name: gw.Name, Namespace: gw.Namespace, Replicas: 1,
		Owner:   *metav1.NewControllerRef(gw, gwv1.SchemeGroupVersion.WithKind("Gateway")),
		Ingress: &Ingress{Gateway: gw, ServiceType: st, Ports: ports, Certs: certs},
	}
	w.applyMeshDefaults(mesh, d)
	return w, nil
}

// infrastructure is the Gateway's spec.infrastructure labels and
// annotations, which the Gateway API asks to be set on the objects
// created for it (ours win on a clash).
func (in *Ingress) infrastructure() (labels, annotations map[string]string) {
	inf := in.Gateway.Spec.Infrastructure
	if inf == nil {
		return nil, nil
	}
	for k, v := range inf.Labels {
		labels = mergeLabels(labels, map[string]string{string(k): string(v)})
	}
	for k, v := range inf.Annotations {
		annotations = mergeLabels(annotations, map[string]string{string(k): string(v)})
	}
	return labels, annotations
}

func (in *Ingress) labels(name string) map[string]string {
	infra, _ := in.infrastructure()
	return mergeLabels(infra, map[string]string{
		LabelManagedBy:        ManagedByValue,
		LabelPartOf:           "ambient",
		LabelComponent:        "ingress-gateway",
		LabelGatewayManaged:   GatewayManagedValue,
		LabelIstioGatewayName: name,
		LabelGatewayName:      name,
		LabelGatewayClassName: string(in.Gateway.Spec.GatewayClassName),
	})
}

// GatewayCertDir is where the ingress gateway finds its HTTPS listeners'
// certificates: the Secrets they reference, mounted read-only.
const GatewayCertDir = "/etc/ambient/gateway-certs"

// adapt turns the waypoint's pod into the ingress gateway's: the ingress
// role, the listener ports instead of HBONE, the HTTPS listeners' Secrets
// mounted, and unprivileged binding of ports below 1024 (a namespaced
// sysctl, so the proxy keeps no capability).
func (in *Ingress) adapt(pod *corev1.PodSpec) {
	c := &pod.Containers[0]
	c.Name = "gateway"
	c.Env = append(c.Env, corev1.EnvVar{Name: "PROXY_ROLE", Value: "ingress"},
		corev1.EnvVar{Name: "GATEWAY_CERT_DIR", Value: GatewayCertDir})
	ports := []corev1.ContainerPort{}
	for _, p := range c.Ports {
		if p.ContainerPort != hbonePort {
			ports = append(ports, p)
		}
	}
	for _, p := range in.Ports {
		ports = append(ports, corev1.ContainerPort{Name: fmt.Sprintf("listener-%d", p.Port), ContainerPort: int32(p.Port), Protocol: corev1.ProtocolTCP})
	}
	c.Ports = ports
	for i, m := range in.Certs {
		vol := fmt.Sprintf("gateway-cert-%d", i)
		pod.Volumes = append(pod.Volumes, corev1.Volume{Name: vol, VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{
			SecretName: m.Secret, Items: []corev1.KeyToPath{{Key: "tls.crt", Path: "tls.crt"}, {Key: "tls.key", Path: "tls.key"}},
		}}})
		c.VolumeMounts = append(c.VolumeMounts, corev1.VolumeMount{Name: vol, MountPath: GatewayCertDir + "/" + m.Dir, ReadOnly: true})
	}
	if pod.SecurityContext == nil {
		pod.SecurityContext = &corev1.PodSecurityContext{}
	}
	pod.SecurityContext.Sysctls = append(pod.SecurityContext.Sysctls,
		corev1.Sysctl{Name: "net.ipv4.ip_unprivileged_port_start", Value: "0"})
}

func (in *Ingress) service(om metav1.ObjectMeta, name string) *corev1.Service {
	var ports []corev1.ServicePort
	for _, p := range in.Ports {
		app := strings.ToLower(string(p.Protocol))
		name := fmt.Sprintf("%s-%d", app, p.Port)
		ports = append(ports, corev1.ServicePort{Name: name, Port: int32(p.Port), TargetPort: intstr.FromInt32(int32(p.Port)),
			Protocol: corev1.ProtocolTCP, AppProtocol: ptr.To(app)})
	}
	ports = append(ports, corev1.ServicePort{Name: "status-port", Port: proxyReadinessPort, TargetPort: intstr.FromInt32(proxyReadinessPort), Protocol: corev1.ProtocolTCP})
	if len(in.ServiceAnnotations) > 0 {
		om.Annotations = mergeLabels(om.Annotations, in.ServiceAnnotations)
	}
	svc := &corev1.Service{
		ObjectMeta: om,
		Spec: corev1.ServiceSpec{
			Type:     in.ServiceType,
			Selector: map[string]string{LabelGatewayName: name},
			Ports:    ports,
			// As Istio's gateways: an address of each family the cluster
			// has (clients outside may be IPv6-only), one on a single-stack
			// cluster.
			IPFamilyPolicy: ptr.To(corev1.IPFamilyPolicyPreferDualStack),
		},
	}
	if in.ServiceType != corev1.ServiceTypeClusterIP {
		svc.Spec.ExternalTrafficPolicy = in.ExternalTrafficPolicy
	}
	return svc
}

// IngressGatewayReconciler deploys an ingress gateway for every Gateway of
// an ingress class we serve: istio, and every other class naming our
// controllerName, as Istio does (waypointbind.IngressClass; istio is left
// alone when another controller owns it, as with istio-waypoint): the L7 proxy in ingress mode behind a Service of
// type LoadBalancer. Status: the Service's external addresses,
// Accepted/Programmed, and per listener its conditions and attached routes.
type IngressGatewayReconciler struct {
	Client client.Client
	// APIReader reads parameters ConfigMaps (not cached: the cache holds
	// only the operator's own ConfigMaps); Client when nil.
	APIReader     client.Reader
	Defaults      Defaults
	RetryInterval time.Duration
	// ParamsRecheck is how often a Gateway with parameters re-reads them
	// (default 1 minute): ConfigMap edits are not watched.
	ParamsRecheck time.Duration
	Now           func() time.Time
}

// +kubebuilder:rbac:groups=gateway.networking.k8s.io,resources=httproutes;grpcroutes;tlsroutes;tcproutes,verbs=get;list;watch
// +kubebuilder:rbac:groups=gateway.networking.k8s.io,resources=referencegrants,verbs=get;list;watch

// Reconcile brings one ingress Gateway to its desired state.
func (r *IngressGatewayReconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	gw, err := gatewayToServe(ctx, r.Client, req, true)
	if gw == nil || err != nil {
		return ctrl.Result{}, err
	}
	status := gw.Status.DeepCopy()
	plan, err := planListeners(ctx, r.Client, gw)
	if err != nil {
		return ctrl.Result{}, err
	}
	result, err := r.reconcile(ctx, gw, plan, status)
	if err == nil && r.usesParameters(ctx, gw) && (result.RequeueAfter == 0 || result.RequeueAfter > r.paramsRecheck()) {
		result.RequeueAfter = r.paramsRecheck()
	}
	if err != nil {
		setGatewayCondition(status, gw.Generation, gwv1.GatewayConditionProgrammed, false, string(gwv1.GatewayReasonPending), err.Error())
	}
	if lerr := r.setListenerStatus(ctx, status, gw, plan.rejected); lerr != nil && err == nil {
		err = lerr
	}
	return result, patchGatewayStatus(ctx, r.Client, gw, status, err)
}

func (r *IngressGatewayReconciler) reconcile(ctx context.Context, gw *gwv1.Gateway, plan listenerPlan, status *gwv1.GatewayStatus) (ctrl.Result, error) {
	mesh, err := activeMesh(ctx, r.Client)
	if err != nil {
		return ctrl.Result{}, err
	}
	retry := acceptedRetry(status, r.RetryInterval, r.now)
	if mesh == nil {
		return waitForMesh(gw, status, "gateway", retry), nil
	}
	w, err := IngressFromGateway(gw, mesh, r.Defaults)
	if err != nil {
		setGatewayCondition(status, gw.Generation, gwv1.GatewayConditionAccepted, false, string(gwv1.GatewayReasonInvalid), err.Error())
		return ctrl.Result{}, nil // fixed only by editing the Gateway, which requeues
	}
	params, transient, err := ingressParameters(ctx, r.reader(), gw)
	if err != nil {
		if transient {
			return ctrl.Result{}, err
		}
		// The objects already applied are kept until the parameters are
		// fixed (re-read every ParamsRecheck).
		setGatewayCondition(status, gw.Generation, gwv1.GatewayConditionAccepted, false, string(gwv1.GatewayReasonInvalidParameters), err.Error())
		return ctrl.Result{}, nil
	}
	params.apply(&w)
	w.Ingress.Ports, w.Ingress.Certs = plan.ports, plan.mounts
	if len(plan.ports) == 0 {
		setGatewayCondition(status, gw.Generation, gwv1.GatewayConditionAccepted, false, string(gwv1.GatewayReasonListenersNotValid), "no listener the gateway can serve: HTTP, HTTPS terminating TLS with certificates that resolve, TLS in Passthrough mode and TCP are supported")
		return ctrl.Result{}, syncCertificateCopies(ctx, r.Client, gw, nil)
	}
	// Copies first, so the pod finds every Secret it mounts.
	if err := syncCertificateCopies(ctx, r.Client, gw, plan.copies); err != nil {
		return ctrl.Result{}, err
	}
	if res, done, err := deployProxy(ctx, r.Client, gw, w, mesh, status, retry); done || err != nil {
		return res, err
	}
	if invalid := invalidListeners(plan.rejected); invalid != "" {
		// Accepted, as some listener is served, but not all of them are
		// (the Gateway API's reason for a partly valid Gateway).
		setGatewayCondition(status, gw.Generation, gwv1.GatewayConditionAccepted, true, string(gwv1.GatewayReasonListenersNotValid), "listeners not accepted: "+invalid)
	}
	return ctrl.Result{}, r.observe(ctx, gw, w.ObjectName(), status, w.Ingress.ServiceType)
}

// invalidListeners lists the listeners refused in themselves (Accepted
// false), not merely for references that do not resolve.
func invalidListeners(rejected map[gwv1.SectionName]route.Rejection) string {
	var names []string
	for name, rej := range rejected {
		if !rej.Refs {
			names = append(names, string(name))
		}
	}
	slices.Sort(names)
	return strings.Join(names, ", ")
}

// observe reports the addresses clients use (the LoadBalancer's, else the
// cluster IP) and Programmed once the replicas are ready and, for a
// LoadBalancer, an address has been assigned.
func (r *IngressGatewayReconciler) observe(ctx context.Context, gw *gwv1.Gateway, name string, status *gwv1.GatewayStatus, st corev1.ServiceType) error {
	dep := &appsv1.Deployment{}
	svc := &corev1.Service{}
	key := client.ObjectKey{Namespace: gw.Namespace, Name: name}
	if err := r.Client.Get(ctx, key, dep); err != nil {
		return client.IgnoreNotFound(err)
	}
	if err := r.Client.Get(ctx, key, svc); err != nil {
		return client.IgnoreNotFound(err)
	}
	status.Addresses = serviceAddresses(svc, st)
	want := ptr.Deref(dep.Spec.Replicas, 1)
	s := dep.Status
	ready := s.ObservedGeneration >= dep.Generation && want > 0 && s.ReadyReplicas >= want && s.UpdatedReplicas >= want
	switch {
	case !ready:
		setGatewayCondition(status, gw.Generation, gwv1.GatewayConditionProgrammed, false, string(gwv1.GatewayReasonPending), fmt.Sprintf("%d/%d replicas ready", s.ReadyReplicas, want))
	case len(status.Addresses) == 0:
		setGatewayCondition(status, gw.Generation, gwv1.GatewayConditionProgrammed, false, string(gwv1.GatewayReasonAddressNotAssigned), "waiting for the LoadBalancer Service to be given an address")
	default:
		setGatewayCondition(status, gw.Generation, gwv1.GatewayConditionProgrammed, true, string(gwv1.GatewayReasonProgrammed), fmt.Sprintf("%d/%d replicas ready", s.ReadyReplicas, want))
	}
	return nil
}

func serviceAddresses(svc *corev1.Service, st corev1.ServiceType) []gwv1.GatewayStatusAddress {
	var out []gwv1.GatewayStatusAddress
	if st == corev1.ServiceTypeLoadBalancer {
		for _, in := range svc.Status.LoadBalancer.Ingress {
			switch {
			case in.IP != "":
				out = append(out, gwv1.GatewayStatusAddress{Type: ptr.To(gwv1.IPAddressType), Value: in.IP})
			case in.Hostname != "":
				out = append(out, gwv1.GatewayStatusAddress{Type: ptr.To(gwv1.HostnameAddressType), Value: in.Hostname})
			}
		}
		return out
	}
	ips := svc.Spec.ClusterIPs
	if len(ips) == 0 && svc.Spec.ClusterIP != "" {
		ips = []string{svc.Spec.ClusterIP}
	}
	for _, ip := range ips {
		if ip != corev1.ClusterIPNone {
			out = append(out, gwv1.GatewayStatusAddress{Type: ptr.To(gwv1.IPAddressType), Value: ip})
		}
	}
	return out
}

// setListenerStatus: served listeners count the routes attached to them
// (by the rules the gateway itself applies); the others say why they are
// not served (rejectedListeners, from the plan), never silently ignored.
func (r *IngressGatewayReconciler) setListenerStatus(ctx context.Context, status *gwv1.GatewayStatus, gw *gwv1.Gateway, rejectedListeners map[gwv1.SectionName]route.Rejection) error {
	attached, err := r.attachedRoutes(ctx, gw)
	if err != nil {
		return err
	}
	programmed := meta.IsStatusConditionTrue(status.Conditions, string(gwv1.GatewayConditionProgrammed))
	var out []gwv1.ListenerStatus
	for _, l := range gw.Spec.Listeners {
		ls := gwv1.ListenerStatus{Name: l.Name, SupportedKinds: []gwv1.RouteGroupKind{}}
		if old := findListenerStatus(status.Listeners, l.Name); old != nil {
			ls.Conditions = old.Conditions
		}
		rejected, refused := rejectedListeners[l.Name]
		// A listener refused in itself (not for a reference) admits no
		// route kind: the suite's TLSRouteListenerTerminateNotSupported
		// wants an empty list on a TLS listener in an unserved mode.
		if !refused || rejected.Refs {
			ls.SupportedKinds = routeKinds(l)
		}
		if !refused || rejected.Refs {
			// Counted even while references do not resolve, as the API asks.
			ls.AttachedRoutes = attached[l.Name]
		}
		setListenerConditions(&ls.Conditions, gw.Generation, string(l.Protocol)+" listener", rejected, "gateway", programmed)
		out = append(out, ls)
	}
	status.Listeners = out
	return nil
}

// routeKinds are the route kinds a listener admits: those of its protocol
// (route.RouteKinds: HTTPRoute and GRPCRoute on HTTP and HTTPS, TLSRoute
// on TLS, TCPRoute on TCP), narrowed by allowedRoutes.kinds.
func routeKinds(l gwv1.Listener) []gwv1.RouteGroupKind {
	all := []gwv1.RouteGroupKind{}
	for _, k := range route.RouteKinds(l.Protocol) {
		all = append(all, gwv1.RouteGroupKind{Group: ptr.To(gwv1.Group(gwv1.GroupName)), Kind: k})
	}
	if l.AllowedRoutes == nil || len(l.AllowedRoutes.Kinds) == 0 {
		return all
	}
	var out []gwv1.RouteGroupKind
	for _, k := range all {
		for _, want := range l.AllowedRoutes.Kinds {
			if want.Kind == k.Kind && (want.Group == nil || *want.Group == gwv1.GroupName) {
				out = append(out, k)
			}
		}
	}
	return out
}

// attachedRoutes counts, per listener, the routes that attach to it.
func (r *IngressGatewayReconciler) attachedRoutes(ctx context.Context, gw *gwv1.Gateway) (map[gwv1.SectionName]int32, error) {
	out := map[gwv1.SectionName]int32{}
	gw, err := resolveGatewaySelectors(ctx, r.Client, gw)
	if err != nil {
		return nil, err
	}
	for _, k := range RouteKinds {
		list := k.newList()
		if err := r.Client.List(ctx, list); err != nil {
			if meta.IsNoMatchError(err) {
				continue // the cluster does not serve this kind
			}
			return nil, err
		}
		err := meta.EachListItem(list, func(o runtime.Object) error {
			obj := o.(client.Object)
			parents, _ := routeRefsOf(obj)
			countAttachments(out, gw, obj.GetNamespace(), k.Name, parents, routeHostnames(obj))
			return nil
		})
		if err != nil {
			return nil, err
		}
	}
	return out, nil
}

func countAttachments(out map[gwv1.SectionName]int32, gw *gwv1.Gateway, routeNS, kind string, refs []gwv1.ParentReference, hosts []gwv1.Hostname) {
	for _, l := range listenersAttached(gw, routeNS, kind, refs, hosts) {
		out[l]++
	}
}

// listenersAttached lists the listeners of gw a route attaches to, by the
// rules the gateway applies (proxylib/route): one implementation, so
// status says what the data path does.
func listenersAttached(gw *gwv1.Gateway, routeNS, kind string, refs []gwv1.ParentReference, hosts []gwv1.Hostname) []gwv1.SectionName {
	var out []gwv1.SectionName
	for _, l := range gw.Spec.Listeners {
		for _, p := range refs {
			if !refersTo(p, routeNS, gw) || p.SectionName != nil && *p.SectionName != l.Name || p.Port != nil && *p.Port != l.Port {
				continue
			}
			if _, ok := route.IntersectHostnames(l.Hostname, hosts); ok && route.ListenerAllows(gw, l, routeNS, kind) {
				out = append(out, l.Name)
				break
			}
		}
	}
	return out
}

func refersTo(p gwv1.ParentReference, routeNS string, gw *gwv1.Gateway) bool {
	ns := routeNS
	if p.Namespace != nil && *p.Namespace != "" {
		ns = string(*p.Namespace)
	}
	return isGatewayParent(p) && ns == gw.Namespace && string(p.Name) == gw.Name
}

// resolveGatewaySelectors resolves gw's listener namespace selectors
// against the namespaces' labels, as the control plane does for the gateway.
func resolveGatewaySelectors(ctx context.Context, c client.Reader, gw *gwv1.Gateway) (*gwv1.Gateway, error) {
	if !route.UsesSelectors(gw) {
		return gw, nil
	}
	var list corev1.NamespaceList
	if err := c.List(ctx, &list); err != nil {
		return nil, err
	}
	labels := make(map[string]map[string]string, len(list.Items))
	for _, ns := range list.Items {
		labels[ns.Name] = ns.Labels
	}
	return route.ResolveSelectors(gw, labels), nil
}

// ingressParent reports a route's attachment to an ingress Gateway, with
// the Gateway API's reasons: no listener the parentRef names
// (NoMatchingParent), none sharing a hostname (NoMatchingListenerHostname),
// or none admitting the route (NotAllowedByListeners).
func ingressParent(gw *gwv1.Gateway, p gwv1.ParentReference, routeNS, kind string, hosts []gwv1.Hostname) parentOutcome {
	o := parentOutcome{ref: p}
	if len(listenersAttached(gw, routeNS, kind, []gwv1.ParentReference{p}, hosts)) > 0 {
		o.accepted, o.acceptedReason, o.acceptMsg = true, string(gwv1.RouteReasonAccepted), "Route was valid"
		return o
	}
	named, sharingHost := parentListeners(gw, p, hosts)
	switch {
	case named == 0:
		o.acceptedReason = string(gwv1.RouteReasonNoMatchingParent)
		o.acceptMsg = fmt.Sprintf("Gateway %s/%s has no listener matching the parentRef's sectionName/port", gw.Namespace, gw.Name)
	case sharingHost == 0:
		o.acceptedReason = string(gwv1.RouteReasonNoMatchingListenerHostname)
		o.acceptMsg = fmt.Sprintf("no listener of Gateway %s/%s shares a hostname with the route (%s)", gw.Namespace, gw.Name, hostList(hosts))
	default:
		o.acceptedReason = string(gwv1.RouteReasonNotAllowedByListeners)
		o.acceptMsg = fmt.Sprintf("no listener of Gateway %s/%s admits this %s (allowedRoutes namespaces and kinds, or a listener the gateway cannot serve)", gw.Namespace, gw.Name, kind)
	}
	return o
}

// parentListeners counts the listeners a parentRef names (sectionName,
// port) and, of those, the ones sharing a hostname with the route.
func parentListeners(gw *gwv1.Gateway, p gwv1.ParentReference, hosts []gwv1.Hostname) (named, sharingHost int) {
	for _, l := range gw.Spec.Listeners {
		if p.SectionName != nil && *p.SectionName != l.Name || p.Port != nil && *p.Port != l.Port {
			continue
		}
		named++
		if _, ok := route.IntersectHostnames(l.Hostname, hosts); ok {
			sharingHost++
		}
	}
	return named, sharingHost
}

func hostList(hosts []gwv1.Hostname) string {
	s := make([]string, len(hosts))
	for i, h := range hosts {
		s[i] = string(h)
	}
	return strings.Join(s, ", ")
}

func (r *IngressGatewayReconciler) reader() client.Reader {
	if r.APIReader != nil {
		return r.APIReader
	}
	return r.Client
}

func (r *IngressGatewayReconciler) paramsRecheck() time.Duration {
	if r.ParamsRecheck > 0 {
		return r.ParamsRecheck
	}
	return time.Minute
}

// usesParameters: the Gateway or its class names a parameters ConfigMap.
func (r *IngressGatewayReconciler) usesParameters(ctx context.Context, gw *gwv1.Gateway) bool {
	gc := &gwv1.GatewayClass{}
	if err := r.Client.Get(ctx, client.ObjectKey{Name: string(gw.Spec.GatewayClassName)}, gc); err != nil {
		gc = nil
	}
	return usesParameters(gw, gc)
}

func (r *IngressGatewayReconciler) now() time.Time {
	if r.Now != nil {
		return r.Now()
	}
	return time.Now()
}

// isIngressGateway: a Gateway of a class we serve as ingress, as the cache
// has it (a class created later enqueues its Gateways).
func (r *IngressGatewayReconciler) isIngressGateway(obj client.Object) bool {
	gw, ok := obj.(*gwv1.Gateway)
	if !ok {
		return false
	}
	served, err := ingressClass(context.Background(), r.Client, string(gw.Spec.GatewayClassName))
	return served || err != nil
}

// SetupWithManager watches ingress Gateways, their children, the mesh, the
// class, the routes (attached-route counts), ReferenceGrants (when served)
// and certificate Secrets (metadata only: no key is held in a cache).
func (r *IngressGatewayReconciler) SetupWithManager(mgr ctrl.Manager, grants bool, routeKinds ...client.Object) error {
	if r.RetryInterval == 0 {
		r.RetryInterval = 30 * time.Second
	}
	b := ctrl.NewControllerManagedBy(mgr).
		Named("ingressgateway").
		For(&gwv1.Gateway{}, builder.WithPredicates(predicate.NewPredicateFuncs(r.isIngressGateway), predicate.GenerationChangedPredicate{})).
		Owns(&appsv1.Deployment{}).
		Owns(&corev1.Service{}).
		Owns(&corev1.ServiceAccount{}).
		Watches(&meshv1.AmbientMesh{}, handler.EnqueueRequestsFromMapFunc(r.allIngressGateways)).
		// A class's Gateways, whenever it changes (created, deleted, its
		// parametersRef): any class but the waypoint one may be an
		// ingress class, and the reconcile decides.
		Watches(&gwv1.GatewayClass{}, handler.EnqueueRequestsFromMapFunc(func(ctx context.Context, o client.Object) []reconcile.Request {
			return gatewaysOfClass(ctx, r.Client, o.GetName())
		}), builder.WithPredicates(predicate.NewPredicateFuncs(func(o client.Object) bool { return o.GetName() != WaypointGatewayClass })))
	// A route changes the attached-route counts of the Gateways it names
	// (before and after an update), and only when its spec changes: our
	// own route status writes, many during a burst of Gateways and
	// routes, reconcile no Gateway.
	for _, k := range routeKinds {
		b = b.Watches(k, handler.EnqueueRequestsFromMapFunc(routeGateways), builder.WithPredicates(predicate.GenerationChangedPredicate{}))
	}
	// Namespace labels decide which routes listener selectors admit.
	b = b.Watches(&corev1.Namespace{}, handler.EnqueueRequestsFromMapFunc(r.allIngressGateways),
		builder.WithPredicates(predicate.LabelChangedPredicate{}))
	if grants {
		b = b.Watches(&gwv1beta1.ReferenceGrant{}, handler.EnqueueRequestsFromMapFunc(func(ctx context.Context, o client.Object) []reconcile.Request {
			return r.gatewaysReferring(ctx, o.GetNamespace(), "")
		}))
	}
	b = b.WatchesMetadata(&corev1.Secret{}, handler.EnqueueRequestsFromMapFunc(r.secretGateways))
	return b.Complete(r)
}

// routeGateways lists the Gateways a route's parentRefs name.
func routeGateways(_ context.Context, o client.Object) []reconcile.Request {
	parents, _ := routeRefsOf(o)
	var reqs []reconcile.Request
	for _, p := range parents {
		if !isGatewayParent(p) {
			continue
		}
		ns := o.GetNamespace()
		if p.Namespace != nil && *p.Namespace != "" {
			ns = string(*p.Namespace)
		}
		reqs = append(reqs, reconcile.Request{NamespacedName: client.ObjectKey{Namespace: ns, Name: string(p.Name)}})
	}
	return reqs
}

// gatewaysReferring lists the ingress Gateways with a certificateRef to a
// Secret of namespace ns (named name; any when "").
func (r *IngressGatewayReconciler) gatewaysReferring(ctx context.Context, ns, name string) []reconcile.Request {
	gws, err := ingressGateways(ctx, r.Client)
	if err != nil {
		return nil
	}
	var reqs []reconcile.Request
	for _, gw := range gws {
		if certificateRefsTo(gw, ns, name) {
			reqs = append(reqs, reconcile.Request{NamespacedName: client.ObjectKeyFromObject(gw)})
		}
	}
	return reqs
}

// secretGateways: the Gateways using a certificate Secret, and the owner
// of a certificate copy (rewritten when changed or deleted).
func (r *IngressGatewayReconciler) secretGateways(ctx context.Context, o client.Object) []reconcile.Request {
	reqs := r.gatewaysReferring(ctx, o.GetNamespace(), o.GetName())
	l := o.GetLabels()
	if l[LabelManagedBy] == ManagedByValue && l[LabelComponent] == componentCertificateCopy && l[LabelGatewayName] != "" {
		reqs = append(reqs, reconcile.Request{NamespacedName: client.ObjectKey{Namespace: o.GetNamespace(), Name: l[LabelGatewayName]}})
	}
	return reqs
}

func (r *IngressGatewayReconciler) allIngressGateways(ctx context.Context, _ client.Object) []reconcile.Request {
	gws, err := ingressGateways(ctx, r.Client)
	if err != nil {
		return nil
	}
	reqs := make([]reconcile.Request, 0, len(gws))
	for _, gw := range gws {
		reqs = append(reqs, reconcile.Request{NamespacedName: client.ObjectKeyFromObject(gw)})
	}
	return reqs
}
