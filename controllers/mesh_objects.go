package controllers

import (
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
)

// DeployedComponents are the cmd/ images the operator puts on nodes and
// into pods (besides its own).
var DeployedComponents = []string{"ztunnel", "ambient-cni", "waypoint", "sidecar"}

// RelatedImageEnv is the variable that names component's image to the
// operator, RELATED_IMAGE_<NAME> as OLM expects: a disconnected mirror
// rewrites these (and the CSV's spec.relatedImages) to the mirror's
// digests.
func RelatedImageEnv(component string) string {
	return "RELATED_IMAGE_" + strings.ToUpper(strings.ReplaceAll(component, "-", "_"))
}

// Defaults are the operator-wide settings a mesh spec may override.
type Defaults struct {
	ZtunnelImage   string
	NodeAgentImage string
	WaypointImage  string
	// SidecarImage is the injected sidecar's (cmd/sidecar; also its init
	// container's).
	SidecarImage string
	// OperatorNamespace is where the manager (control plane) runs.
	OperatorNamespace string
	// ManagerPodLabels select the manager pods behind the control-plane Service.
	ManagerPodLabels map[string]string
}

// controlPlaneHost is the DNS name proxies use to reach discovery and the CA.
func controlPlaneHost(meshNS string) string {
	return ControlPlaneService + "." + meshNS + ".svc"
}

// excludedNamespaces are never captured: kube-system, the mesh namespace and
// the user's list, sorted and unique.
func excludedNamespaces(mesh *meshv1.AmbientMesh) []string {
	set := map[string]bool{"kube-system": true, mesh.Spec.Namespace: true}
	for _, ns := range mesh.Spec.Capture.ExcludedNamespaces {
		set[ns] = true
	}
	out := make([]string, 0, len(set))
	for ns := range set {
		out = append(out, ns)
	}
	sort.Strings(out)
	return out
}

func ownerRef(mesh *meshv1.AmbientMesh) metav1.OwnerReference {
	return *metav1.NewControllerRef(mesh, meshv1.GroupVersion.WithKind("AmbientMesh"))
}

func meshObjectMeta(mesh *meshv1.AmbientMesh, name, component string) metav1.ObjectMeta {
	return metav1.ObjectMeta{
		Name:            name,
		Namespace:       mesh.Spec.Namespace,
		Labels:          meshLabels(mesh.Name, component),
		OwnerReferences: []metav1.OwnerReference{ownerRef(mesh)},
	}
}

func desiredServiceAccount(mesh *meshv1.AmbientMesh, name string) *corev1.ServiceAccount {
	return &corev1.ServiceAccount{
		ObjectMeta: meshObjectMeta(mesh, name, name),
		// Proxies use a projected token with the mesh audience instead.
		AutomountServiceAccountToken: ptr.To(false),
	}
}

// nodeAgentRules is everything the node agent may do: see pods and
// namespaces to decide capture, annotate pods it captured, and watch the
// mesh to release pods when it is being deleted. ztunnel gets no rules: it
// talks only to the control plane.
func nodeAgentRules() []rbacv1.PolicyRule {
	return []rbacv1.PolicyRule{
		{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"get", "list", "watch", "patch"}},
		{APIGroups: []string{""}, Resources: []string{"namespaces"}, Verbs: []string{"get", "list", "watch"}},
		{APIGroups: []string{meshv1.GroupVersion.Group}, Resources: []string{"ambientmeshes"}, Verbs: []string{"get", "list", "watch"}},
		// Captured, Released and CaptureFailed Events on pods.
		{APIGroups: []string{"events.k8s.io"}, Resources: []string{"events"}, Verbs: []string{"create", "patch"}},
	}
}

func desiredNodeAgentClusterRole(mesh *meshv1.AmbientMesh) *rbacv1.ClusterRole {
	return &rbacv1.ClusterRole{
		ObjectMeta: metav1.ObjectMeta{Name: NodeAgentName, Labels: meshLabels(mesh.Name, NodeAgentName), OwnerReferences: []metav1.OwnerReference{ownerRef(mesh)}},
		Rules:      nodeAgentRules(),
	}
}

func desiredNodeAgentClusterRoleBinding(mesh *meshv1.AmbientMesh) *rbacv1.ClusterRoleBinding {
	return &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: NodeAgentName, Labels: meshLabels(mesh.Name, NodeAgentName), OwnerReferences: []metav1.OwnerReference{ownerRef(mesh)}},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: NodeAgentName},
		Subjects:   []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Name: NodeAgentName, Namespace: mesh.Spec.Namespace}},
	}
}

// desiredControlPlaneServices expose the manager's discovery, CA and debug
// ports as ambient-controlplane in the operator's namespace; when the mesh
// namespace differs, an ExternalName alias of the same name there gives
// proxies the stable address ambient-controlplane.<mesh-ns>.svc.
func desiredControlPlaneServices(mesh *meshv1.AmbientMesh, d Defaults) []*corev1.Service {
	ns := d.OperatorNamespace
	if ns == "" {
		ns = mesh.Spec.Namespace
	}
	svc := &corev1.Service{ObjectMeta: meshObjectMeta(mesh, ControlPlaneService, "controlplane")}
	svc.Namespace = ns
	svc.Spec.Type = corev1.ServiceTypeClusterIP
	svc.Spec.Selector = d.ManagerPodLabels
	svc.Spec.Ports = []corev1.ServicePort{
		{Name: "grpc-xds", Port: xdsPort, TargetPort: intstr.FromInt32(xdsPort), Protocol: corev1.ProtocolTCP},
		{Name: "grpc-ca", Port: caPort, TargetPort: intstr.FromInt32(caPort), Protocol: corev1.ProtocolTCP},
		{Name: "https-debug", Port: debugPort, TargetPort: intstr.FromInt32(debugPort), Protocol: corev1.ProtocolTCP},
	}
	if ns == mesh.Spec.Namespace {
		return []*corev1.Service{svc}
	}
	alias := &corev1.Service{ObjectMeta: meshObjectMeta(mesh, ControlPlaneService, "controlplane")}
	alias.Spec.Type = corev1.ServiceTypeExternalName
	alias.Spec.ExternalName = ControlPlaneService + "." + ns + ".svc." + clusterDomain(mesh)
	return []*corev1.Service{svc, alias}
}

func desiredRootCertConfigMap(mesh *meshv1.AmbientMesh, namespace string, rootsPEM []byte) *corev1.ConfigMap {
	meta := meshObjectMeta(mesh, RootCertConfigMap, "trust-bundle")
	meta.Namespace = namespace
	return &corev1.ConfigMap{ObjectMeta: meta, Data: map[string]string{RootCertKey: string(rootsPEM)}}
}

func fieldEnv(name, path string) corev1.EnvVar {
	return corev1.EnvVar{Name: name, ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: path}}}
}

// proxyEnv is the environment contract shared by ztunnel and waypoints
// (docs/interfaces.md, "Operator → proxies").
func proxyEnv(mesh *meshv1.AmbientMesh, transport meshv1.HBONETransport, logLevel meshv1.LogLevel) []corev1.EnvVar {
	host := controlPlaneHost(mesh.Spec.Namespace)
	return []corev1.EnvVar{
		fieldEnv("NODE_NAME", "spec.nodeName"),
		fieldEnv("POD_NAME", "metadata.name"),
		fieldEnv("POD_NAMESPACE", "metadata.namespace"),
		{Name: "TRUST_DOMAIN", Value: mesh.Spec.TrustDomain},
		{Name: "XDS_ADDRESS", Value: fmt.Sprintf("%s:%d", host, xdsPort)},
		{Name: "XDS_SERVER_NAME", Value: host},
		{Name: "CA_ADDRESS", Value: fmt.Sprintf("%s:%d", host, caPort)},
		{Name: "CA_SERVER_NAME", Value: host},
		{Name: "HBONE_TRANSPORT", Value: string(transport)},
		{Name: "LOG_LEVEL", Value: string(logLevel)},
		// The Go runtime's soft memory limit follows the container's limit
		// (AmbientMesh/WaypointPolicy resources): the GC works harder near
		// it instead of the kernel killing the proxy.
		{Name: "GOMEMLIMIT", ValueFrom: &corev1.EnvVarSource{ResourceFieldRef: &corev1.ResourceFieldSelector{Resource: "limits.memory"}}},
		{Name: "ROOT_CERT", Value: rootCertMountDir + "/" + RootCertKey},
		{Name: "TOKEN_PATH", Value: tokenMountDir + "/" + tokenFile},
	}
}

// proxyVolumes: the mesh trust bundle and a short-lived token for the mesh
// audience; nothing else from the API server.
func proxyVolumes() ([]corev1.Volume, []corev1.VolumeMount) {
	vols := []corev1.Volume{
		{Name: "ambient-token", VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{
			Sources: []corev1.VolumeProjection{{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{
				Audience: TokenAudience, ExpirationSeconds: ptr.To[int64](tokenExpirySeconds), Path: tokenFile,
			}}},
		}}},
		{Name: "ambient-root-cert", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
			LocalObjectReference: corev1.LocalObjectReference{Name: RootCertConfigMap},
		}}},
		{Name: "tmp", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}},
	}
	mounts := []corev1.VolumeMount{
		{Name: "ambient-token", MountPath: tokenMountDir, ReadOnly: true},
		{Name: "ambient-root-cert", MountPath: rootCertMountDir, ReadOnly: true},
		{Name: "tmp", MountPath: "/tmp"},
	}
	return vols, mounts
}

func hostPathVolume(name, path string, t corev1.HostPathType) corev1.Volume {
	return corev1.Volume{Name: name, VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: path, Type: &t}}}
}

// nodeTolerations: the user's, or tolerate everything so every node that
// may run captured pods has a ztunnel (as Istio does).
func nodeTolerations(mesh *meshv1.AmbientMesh) []corev1.Toleration {
	if len(mesh.Spec.Ztunnel.Tolerations) > 0 {
		return mesh.Spec.Ztunnel.Tolerations
	}
	return []corev1.Toleration{{Operator: corev1.TolerationOpExists}}
}

// Rollouts. ztunnel surges: the new pod starts next to the old one (own pod
// network, so no host port clash), both serve every captured pod
// (SO_REUSEPORT in the pod), and the old one is stopped only once the new
// one is ready, then drains. Kubernetes requires maxUnavailable 0 when
// maxSurge is set (and not both 0). The node agent cannot surge: it holds
// host port 15022 and the CNI socket; while it restarts pods keep working.
var (
	surgeRollout = appsv1.DaemonSetUpdateStrategy{
		Type: appsv1.RollingUpdateDaemonSetStrategyType,
		RollingUpdate: &appsv1.RollingUpdateDaemonSet{
			MaxSurge: ptr.To(intstr.FromInt32(1)), MaxUnavailable: ptr.To(intstr.FromInt32(0))},
	}
	replaceRollout = appsv1.DaemonSetUpdateStrategy{
		Type:          appsv1.RollingUpdateDaemonSetStrategyType,
		RollingUpdate: &appsv1.RollingUpdateDaemonSet{MaxUnavailable: ptr.To(intstr.FromInt32(1))},
	}
)

// ztunnelGracePeriod is the ztunnel pod's terminationGracePeriodSeconds
// unless the spec sets one; ztunnel drains for that less
// ztunnelCloseMargin (env DRAIN_GRACE), leaving time to close what is left
// before the kubelet's SIGKILL.
const (
	ztunnelGracePeriod = 30 * time.Second
	ztunnelCloseMargin = 5 * time.Second
)

// ztunnelGrace returns the ztunnel pods' termination grace period and the
// drain grace inside it.
func ztunnelGrace(z meshv1.ZtunnelSpec) (period, drain time.Duration) {
	period = ztunnelGracePeriod
	if s := z.TerminationGracePeriodSeconds; s != nil && time.Duration(*s)*time.Second > ztunnelCloseMargin {
		period = time.Duration(*s) * time.Second
	}
	return period, period - ztunnelCloseMargin
}

func daemonSet(mesh *meshv1.AmbientMesh, name string, pod corev1.PodSpec, rollout appsv1.DaemonSetUpdateStrategy) *appsv1.DaemonSet {
	selector := map[string]string{"app": name, LabelMesh: mesh.Name}
	return &appsv1.DaemonSet{
		ObjectMeta: meshObjectMeta(mesh, name, name),
		Spec: appsv1.DaemonSetSpec{
			Selector:       &metav1.LabelSelector{MatchLabels: selector},
			UpdateStrategy: *rollout.DeepCopy(),
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{
					Labels: mergeLabels(meshLabels(mesh.Name, name), map[string]string{
						// Mesh components are never captured themselves.
						"istio.io/dataplane-mode": "none",
					}),
					Annotations: map[string]string{meshRedirectionLabel: "disabled"},
				},
				Spec: pod,
			},
		},
	}
}

// DesiredZtunnel: ztunnel runs in its own pod network (not host network);
// the node agent hands it each captured pod's netns over the socket in
// /var/run/ambient, and it needs NET_ADMIN/SYS_ADMIN/NET_RAW to enter them
// and mark sockets. It never talks to the API server.
func DesiredZtunnel(mesh *meshv1.AmbientMesh, d Defaults) *appsv1.DaemonSet {
	z := mesh.Spec.Ztunnel
	image := z.Image
	if image == "" {
		image = d.ZtunnelImage
	}
	grace, drainGrace := ztunnelGrace(z)
	vols, mounts := proxyVolumes()
	vols = append(vols, hostPathVolume("ambient-socket", ZDSSocketDir, corev1.HostPathDirectoryOrCreate))
	mounts = append(mounts, corev1.VolumeMount{Name: "ambient-socket", MountPath: ZDSSocketDir})
	env := append(proxyEnv(mesh, z.Transport, z.LogLevel),
		corev1.EnvVar{Name: "ZDS_SOCKET", Value: ZDSSocketDir + "/ztunnel.sock"},
		corev1.EnvVar{Name: "DRAIN_GRACE", Value: drainGrace.String()},
		corev1.EnvVar{Name: "CLUSTER_DOMAIN", Value: clusterDomain(mesh)})
	if n := z.WorkerThreads; n != nil {
		env = append(env, corev1.EnvVar{Name: "WORKER_THREADS", Value: strconv.Itoa(int(*n))})
	}
	pod := corev1.PodSpec{
		ServiceAccountName:            ZtunnelName,
		AutomountServiceAccountToken:  ptr.To(false),
		PriorityClassName:             priorityClassOr(z.PriorityClassName),
		TerminationGracePeriodSeconds: ptr.To(int64(grace / time.Second)),
		NodeSelector:                  z.NodeSelector,
		Tolerations:                   nodeTolerations(mesh),
		Volumes:                       vols,
		Containers: []corev1.Container{{
			Name:            "ztunnel",
			Image:           image,
			ImagePullPolicy: corev1.PullIfNotPresent,
			Env:             env,
			Resources:       resourcesOr(z.Resources, ztunnelResources),
			VolumeMounts:    mounts,
			Ports: []corev1.ContainerPort{
				{Name: "http-metrics", ContainerPort: proxyMetricsPort, Protocol: corev1.ProtocolTCP},
				{Name: "http-ready", ContainerPort: proxyReadinessPort, Protocol: corev1.ProtocolTCP},
			},
			ReadinessProbe: &corev1.Probe{
				ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/healthz/ready", Port: intstr.FromInt32(proxyReadinessPort)}},
				PeriodSeconds: 5, FailureThreshold: 3,
			},
			SecurityContext: &corev1.SecurityContext{
				Privileged:               ptr.To(false),
				AllowPrivilegeEscalation: ptr.To(false),
				ReadOnlyRootFilesystem:   ptr.To(true),
				RunAsUser:                ptr.To[int64](0),
				RunAsNonRoot:             ptr.To(false),
				Capabilities: &corev1.Capabilities{
					Add:  []corev1.Capability{"NET_ADMIN", "SYS_ADMIN", "NET_RAW"},
					Drop: []corev1.Capability{"ALL"},
				},
			},
		}},
	}
	return daemonSet(mesh, ZtunnelName, pod, surgeRollout)
}

// cniPlatformDirs are each platform's CNI configuration and binary
// directories on the host (Istio's documented platform prerequisites).
var cniPlatformDirs = map[meshv1.CNIPlatform][2]string{
	meshv1.CNIPlatformStandard:  {"/etc/cni/net.d", "/opt/cni/bin"},
	meshv1.CNIPlatformGKE:       {"/etc/cni/net.d", "/home/kubernetes/bin"},
	meshv1.CNIPlatformK3s:       {"/var/lib/rancher/k3s/agent/etc/cni/net.d", "/var/lib/rancher/k3s/data/current/bin"},
	meshv1.CNIPlatformK3d:       {"/var/lib/rancher/k3s/agent/etc/cni/net.d", "/bin"},
	meshv1.CNIPlatformMicroK8s:  {"/var/snap/microk8s/current/args/cni-network", "/var/snap/microk8s/current/opt/cni/bin"},
	meshv1.CNIPlatformOpenShift: {"/etc/kubernetes/cni/net.d", "/var/lib/cni/bin"},
}

// cniHostRoot is where the node agent sees the host's / when it looks for
// (auto) or follows (OpenShift's multus delegate) CNI directories itself.
const cniHostRoot = "/host/root"

// cniNodeMounts: the node agent's CNI volumes and env. Fixed platforms
// mount the two directories; auto and OpenShift mount the host's / and
// pass host paths (empty under auto: detected on the node).
func cniNodeMounts(c meshv1.CNISpec) ([]corev1.Volume, []corev1.VolumeMount, []corev1.EnvVar) {
	if c.Platform == meshv1.CNIPlatformAuto || c.Platform == meshv1.CNIPlatformOpenShift {
		confDir, binDir := c.ConfDir, c.BinDir
		if c.Platform == meshv1.CNIPlatformOpenShift {
			confDir, binDir = CNIDirs(c)
		}
		hostToContainer := corev1.MountPropagationHostToContainer
		return []corev1.Volume{hostPathVolume("host-root", "/", corev1.HostPathDirectory)},
			[]corev1.VolumeMount{{Name: "host-root", MountPath: cniHostRoot, MountPropagation: &hostToContainer}},
			[]corev1.EnvVar{{Name: "CNI_HOST_ROOT", Value: cniHostRoot}, {Name: "CNI_CONF_DIR", Value: confDir}, {Name: "CNI_BIN_DIR", Value: binDir}}
	}
	confDir, binDir := CNIDirs(c)
	return []corev1.Volume{
			hostPathVolume("cni-bin-dir", binDir, corev1.HostPathDirectoryOrCreate),
			hostPathVolume("cni-net-dir", confDir, corev1.HostPathDirectoryOrCreate),
		},
		[]corev1.VolumeMount{{Name: "cni-bin-dir", MountPath: "/host/opt/cni/bin"}, {Name: "cni-net-dir", MountPath: "/host/etc/cni/net.d"}},
		[]corev1.EnvVar{{Name: "CNI_BIN_DIR", Value: "/host/opt/cni/bin"}, {Name: "CNI_CONF_DIR", Value: "/host/etc/cni/net.d"}}
}

// CNIDirs resolves the host's CNI configuration and binary directories:
// the platform's, overridden by explicit ones.
func CNIDirs(c meshv1.CNISpec) (confDir, binDir string) {
	dirs, ok := cniPlatformDirs[c.Platform]
	if !ok {
		dirs = cniPlatformDirs[meshv1.CNIPlatformStandard]
	}
	confDir, binDir = dirs[0], dirs[1]
	if c.ConfDir != "" {
		confDir = c.ConfDir
	}
	if c.BinDir != "" {
		binDir = c.BinDir
	}
	return confDir, binDir
}

// inboundMode is the mesh's inbound capture mode, NAT when unset.
func inboundMode(mesh *meshv1.AmbientMesh) meshv1.InboundCaptureMode {
	if mesh.Spec.Capture.InboundMode == "" {
		return meshv1.InboundNAT
	}
	return mesh.Spec.Capture.InboundMode
}

// DesiredNodeAgent: the capture agent is privileged on the host network: it
// installs the CNI plugin and config on the host, enters pod network
// namespaces to install redirection, and passes them to ztunnel.
func DesiredNodeAgent(mesh *meshv1.AmbientMesh, d Defaults) *appsv1.DaemonSet {
	image := d.NodeAgentImage
	cniVols, cniMounts, cniEnv := cniNodeMounts(mesh.Spec.NodeAgent.CNI)
	hostToContainer := corev1.MountPropagationHostToContainer
	pod := corev1.PodSpec{
		ServiceAccountName: NodeAgentName,
		// Unlike the proxies, the node agent talks to the API server (pods,
		// namespaces, its mesh); its ServiceAccount disables automounting.
		AutomountServiceAccountToken:  ptr.To(true),
		PriorityClassName:             priorityClassOr(mesh.Spec.NodeAgent.PriorityClassName),
		HostNetwork:                   true,
		DNSPolicy:                     corev1.DNSClusterFirstWithHostNet,
		TerminationGracePeriodSeconds: ptr.To[int64](30),
		NodeSelector:                  mesh.Spec.Ztunnel.NodeSelector,
		Tolerations:                   nodeTolerations(mesh),
		Volumes: append(cniVols,
			hostPathVolume("ambient-socket", ZDSSocketDir, corev1.HostPathDirectoryOrCreate),
			hostPathVolume("host-netns", "/var/run/netns", corev1.HostPathDirectoryOrCreate),
			hostPathVolume("host-proc", "/proc", corev1.HostPathDirectory),
		),
		Containers: []corev1.Container{{
			Name:            "node-agent",
			Image:           image,
			ImagePullPolicy: corev1.PullIfNotPresent,
			Args:            []string{"node-agent"},
			Resources:       resourcesOr(mesh.Spec.NodeAgent.Resources, nodeAgentResources),
			Env: append(cniEnv,
				fieldEnv("NODE_NAME", "spec.nodeName"),
				fieldEnv("POD_NAMESPACE", "metadata.namespace"),
				corev1.EnvVar{Name: "MESH_NAME", Value: mesh.Name},
				corev1.EnvVar{Name: "MESH_NAMESPACE", Value: mesh.Spec.Namespace},
				corev1.EnvVar{Name: "EXCLUDED_NAMESPACES", Value: strings.Join(excludedNamespaces(mesh), ",")},
				corev1.EnvVar{Name: "REDIRECTION_BACKEND", Value: string(mesh.Spec.Capture.Redirection)},
				corev1.EnvVar{Name: "DNS_CAPTURE", Value: strconv.FormatBool(mesh.Spec.Capture.DNSCapture)},
				corev1.EnvVar{Name: "INBOUND_CAPTURE", Value: string(inboundMode(mesh))},
				corev1.EnvVar{Name: "ZDS_SOCKET", Value: ZDSSocketDir + "/ztunnel.sock"},
				corev1.EnvVar{Name: "HEALTH_PORT", Value: fmt.Sprint(nodeAgentHealthPort)},
				corev1.EnvVar{Name: "LOG_LEVEL", Value: string(mesh.Spec.Ztunnel.LogLevel)},
			),
			VolumeMounts: append(cniMounts,
				corev1.VolumeMount{Name: "ambient-socket", MountPath: ZDSSocketDir},
				corev1.VolumeMount{Name: "host-netns", MountPath: "/var/run/netns", MountPropagation: &hostToContainer},
				corev1.VolumeMount{Name: "host-proc", MountPath: "/host/proc", ReadOnly: true},
			),
			ReadinessProbe: &corev1.Probe{
				ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/readyz", Port: intstr.FromInt32(nodeAgentHealthPort)}},
				PeriodSeconds: 5, FailureThreshold: 3,
			},
			SecurityContext: &corev1.SecurityContext{Privileged: ptr.To(true), RunAsUser: ptr.To[int64](0)},
		}},
	}
	return daemonSet(mesh, NodeAgentName, pod, replaceRollout)
}
