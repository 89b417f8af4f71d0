# Shared settings and helpers of the lab scripts (sourced, not run).
# shellcheck shell=bash

ROOT=${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
K8S_VERSION=${K8S_VERSION:-1.36.3}
COREDNS_VERSION=${COREDNS_VERSION:-v1.12.4}
K8S_BIN=$ROOT/bin/k8s/$K8S_VERSION
COREDNS_BIN=$ROOT/bin/coredns/$COREDNS_VERSION/coredns
LAB=${LAB_DIR:-$ROOT/bin/lab}          # everything the lab writes, except /run/alab
STATE=$LAB/state                       # runtime state, removed by down
LOGS=$LAB/logs                         # component logs of the last run (kept after down)
PKI=$LAB/pki                           # certificates (kept: regenerating them buys nothing)
IMAGES=$LAB/images                     # lab image tarballs (test/lab/imagebuild)
KUBECONFIG_FILE=$LAB/kubeconfig
RUN=${LAB_RUN:-/run/alab}              # namespace handles (must be on a private mount); machine-wide

# Names: every host-visible object starts with "alab" so teardown and other
# engineers can tell it apart.
PREFIX=alab
BRIDGE=alab0
GUARD_COMMENT="ambient-lab-guard"

# Addressing. The node network lives on the lab bridge; the host holds only
# BRIDGE_IP (for kubectl). Pod and service ranges never appear in the host's
# routing table, and the host's ip_forward is left alone, so nothing the lab
# runs can reach the uplink.
NODE_NET=10.201.0.0/24
BRIDGE_IP=10.201.0.1
CP_IP=10.201.0.2
CLUSTER_CIDR=10.244.0.0/16
SERVICE_CIDR=10.96.0.0/16
KUBERNETES_SVC_IP=10.96.0.1
DNS_SVC_IP=10.96.0.10
CLUSTER_DOMAIN=cluster.local
APISERVER=https://$CP_IP:6443
# "Outside the cluster": a network namespace on the lab bridge that is not a
# node (the seeds' curl to the ingress address), and the addresses MetalLB
# hands to LoadBalancer Services (announced on the bridge by ARP, L2 mode).
OUTSIDE_IP=10.201.0.250
# "An external service": a host outside the cluster that pods reach (the
# egress scenarios' ServiceEntry endpoint). On the lab bridge, not a node,
# with routes back to the pod networks through their nodes (as a network
# where pod addresses are routable); the lab's CoreDNS knows it as
# external.lab.example (manifests/coredns.yaml).
EXTERNAL_IP=10.201.0.251
LB_POOL=10.201.0.200-10.201.0.220

# Dual-stack (LAB_DUAL_STACK=1, the default; 0 for IPv4 only): the same
# layout with IPv6 unique local addresses beside the IPv4 ones. Nodes get
# fd00:201::1<N> on the lab bridge (the host holds only fd00:201::1), pods
# fd00:244:<N>::/64 per node, Services a second cluster IP from
# fd00:96::/112. IPv4 stays the primary family (listed first), so
# single-stack Services and every IPv4 scenario are unchanged. Nothing is
# routed or forwarded toward the uplink for IPv6 either (guard_up).
# A flannel worker (LAB_FLANNEL_NODES) runs IPv4 only: its default is 0.
export LAB_DUAL_STACK=${LAB_DUAL_STACK:-$([ -n "${LAB_FLANNEL_NODES:-}" ] && echo 0 || echo 1)}
NODE_NET6=fd00:201::/64
BRIDGE_IP6=fd00:201::1
CP_IP6=fd00:201::2
OUTSIDE_IP6=fd00:201::250
LB_POOL6=fd00:201::200-fd00:201::220
CLUSTER_CIDR6=fd00:244::/32
SERVICE_CIDR6=fd00:96::/112
dual_stack() { [ "$LAB_DUAL_STACK" = 1 ]; }
# lab_dual_stack: whether the running lab is dual-stack (as it came up,
# whatever this shell's LAB_DUAL_STACK says).
lab_dual_stack() { [ "$(cat "$STATE/dual-stack" 2>/dev/null || echo "$LAB_DUAL_STACK")" = 1 ]; }
# node_ip6 / pod_cidr6 <short>: a worker's IPv6 node address and pod range
# (cp has index 0: fd00:201::2 is CP_IP6).
node_ip6() { local i=${1#w}; [ "$1" = cp ] && { echo "$CP_IP6"; return; }; echo "fd00:201::$((10 + i))"; }
pod_cidr6() { echo "fd00:244:${1#w}::/64"; }
# svc_cidrs / cluster_cidrs: the ranges for flags taking one per family.
svc_cidrs() { if dual_stack; then echo "$SERVICE_CIDR,$SERVICE_CIDR6"; else echo "$SERVICE_CIDR"; fi; }
cluster_cidrs() { if dual_stack; then echo "$CLUSTER_CIDR,$CLUSTER_CIDR6"; else echo "$CLUSTER_CIDR"; fi; }

# Worker nodes: "<short> <node name> <node ip> <pod cidr>".
LAB_WORKERS=${LAB_WORKERS:-2}
workers() {
  local i
  for ((i = 1; i <= LAB_WORKERS; i++)); do
    local name=ambient-worker
    [ "$i" -gt 1 ] && name=ambient-worker$i
    echo "w$i $name 10.201.0.$((10 + i)) 10.244.$i.0/24"
  done
}

# Node shapes. A worker's pod network is the CNI bridge plugin with static
# routes between nodes, unless its short name is in LAB_FLANNEL_NODES (e.g.
# "w3"): then flanneld (kube subnet manager, vxlan backend, inside the node's
# namespaces) and flannel's CNI plugin own it, as on a flannel cluster.
LAB_FLANNEL_NODES=${LAB_FLANNEL_NODES:-}
FLANNEL_VERSION=${FLANNEL_VERSION:-v0.28.10}
FLANNEL_BIN=$ROOT/bin/flannel/$FLANNEL_VERSION
FLANNEL_BACKEND=${FLANNEL_BACKEND:-vxlan}
node_cni() { if [[ " $LAB_FLANNEL_NODES " == *" $1 "* ]]; then echo flannel; else echo bridge; fi; }

# Paths that kubelet, containerd and CNI hard-code; each node gets private
# copies in its own mount namespace. /run is a private tmpfs per node, which
# also covers hostPath users such as /var/run/ambient.
NODE_BIND_PATHS=(/var/lib/kubelet /var/lib/containerd /var/lib/cni /var/log /etc/cni /opt/cni)

T0=${T0:-$(date +%s.%N)}
export T0
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%6.1fs", b - a }'; }
say() { echo "[$(elapsed)] $*"; }
die() { echo "[$(elapsed)] ERROR: $*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "the lab needs root (network and mount namespaces)"; }

# kc runs kubectl against the lab.
kc() { kubectl --kubeconfig "$KUBECONFIG_FILE" "$@"; }

# wait_for <seconds> <description> <command...>: polls until the command succeeds.
wait_for() {
  local timeout=$1 what=$2; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { say "timed out after ${timeout}s waiting for $what"; return 1; }
    sleep 0.5
  done
}

netns_path() { echo "/run/netns/$PREFIX-$1"; }
mntns_path() { echo "$RUN/ns/$1.mnt"; }

# in_node <short> <cmd...>: runs a command inside a node's network and mount namespaces.
in_node() {
  local n=$1; shift
  nsenter --mount="$(mntns_path "$n")" --net="$(netns_path "$n")" -- "$@"
}
in_cp() { nsenter --net="$(netns_path cp)" -- "$@"; }
# outside <cmd...>: runs a command as the client outside the cluster.
outside() { ip netns exec "$PREFIX-out" "$@"; }
# external <cmd...>: runs a command on the external service host.
external() { ip netns exec "$PREFIX-ext" "$@"; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# restart_operator: a lab already up keeps the operator of an earlier
# checkout under the same image tag; restarting it makes a run test this
# checkout's code.
restart_operator() {
  kc -n ambient-system rollout restart deploy/ambient-controller-manager >/dev/null &&
    kc -n ambient-system rollout status deploy/ambient-controller-manager --timeout=120s >/dev/null ||
    die "operator did not restart"
}

# conformance_suite <title> <report> <run> <timeout> <log>: runs the
# upstream conformance suite's test <run> (module test/conformance),
# writing its report to <report> and its output to <log>, then prints a
# summary of the subtests; returns go test's status.
conformance_suite() {
  local title=$1 report=$2 run=$3 timeout=$4 log=$5 rc
  mkdir -p "$(dirname "$report")"
  say "conformance: $title"
  (cd "$ROOT/test/conformance" && CONFORMANCE_REPORT=$report go test -tags conformance -count=1 -v \
    -timeout "$timeout" -run "$run" .) 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  echo
  echo "=== $title summary"
  grep -E '^\s+--- (PASS|FAIL|SKIP)' "$log" | sed 's/^ *//' | sort | uniq -c | sort -rn | head -100
  [ -f "$report" ] && say "report: $report"
  return "$rc"
}
