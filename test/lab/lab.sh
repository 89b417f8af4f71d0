#!/usr/bin/env bash
# The lab: a real multi-node Kubernetes cluster on this one machine.
#
#   control plane  netns alab-cp   etcd, kube-apiserver, controller-manager, scheduler
#   worker N       netns alab-wN + its own mount namespace: containerd, kubelet, kube-proxy
#   lab bridge     alab0 (10.201.0.0/24) joins them; the host keeps 10.201.0.1 for kubectl
#
# Usage: test/lab/lab.sh up|down|status|env
#   up      idempotent: builds what is missing, starts what is not running
#   down    stops every process the lab started and removes every namespace,
#           mount, bridge, veth, cgroup and firewall rule it created
#   status  processes, nodes and pods
#   env     prints `export KUBECONFIG=...` for eval
#   images  imports new image tarballs (bin/lab/images, bin/images) into every node
#   tag SRC DST  tags an imported image with another name on every node
#   signal NODE CONTAINER SIG  sends SIG to a container's task on NODE (a node
#           name such as ambient-worker2; the container id of a pod's status,
#           with or without containerd://): the chaos tests' SIGKILL
#
# Hooks: LAB_WORKERS (default 2); LAB_CNI_CHAIN a JSON object appended to
# every node's CNI conflist (e.g. our ambient-cni plugin) when the conflist is
# first written; extra images: every bin/images/*.tar is imported into every node.
# LAB_FLANNEL_NODES (e.g. "w3", with LAB_WORKERS=3): those workers' pod
# network is flannel instead of the bridge plugin (lib.sh).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

# ---------------------------------------------------------------- preflight
ensure_packages() {
  local missing=() pkg bin
  for pair in containerd:containerd runc:runc containernetworking-plugins:/usr/lib/cni/bridge \
    conntrack:conntrack iptables:iptables nftables:nft iproute2:ip util-linux:nsenter openssl:openssl; do
    pkg=${pair%%:*}; bin=${pair#*:}
    if [[ $bin == /* ]]; then [ -e "$bin" ] || missing+=("$pkg"); else command -v "$bin" >/dev/null || missing+=("$pkg"); fi
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing packages: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >"$LOGS/apt.log" 2>&1 ||
      { apt-get update >>"$LOGS/apt.log" 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >>"$LOGS/apt.log" 2>&1; } ||
      die "apt-get install ${missing[*]} failed (see $LOGS/apt.log)"
  fi
}

ensure_binaries() {
  local missing=0 c
  for c in etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy; do
    [ -x "$K8S_BIN/$c" ] || missing=1
  done
  if [ $missing = 1 ]; then say "building Kubernetes components (first time only)"; "$ROOT/test/lab/build.sh" k8s; fi
  [ -x "$COREDNS_BIN" ] || { say "building CoreDNS (first time only)"; "$ROOT/test/lab/build.sh" coredns; }
  if [ -n "$LAB_FLANNEL_NODES" ] && ! [ -x "$FLANNEL_BIN/flanneld" ]; then "$ROOT/test/lab/build.sh" flannel; fi
  if [ ! -f "$IMAGES/pause.tar" ] || [ ! -f "$IMAGES/coredns.tar" ] || [ -n "${LAB_REBUILD_IMAGES:-}" ]; then
    "$ROOT/test/lab/build.sh" images
  fi
}

# ------------------------------------------------------------------ network
uplink_dev() { ip "${1:--4}" route show default | awk '{for (i = 1; i < NF; i++) if ($i == "dev") { print $(i + 1); exit }}'; }

net_up() {
  mkdir -p "$RUN/ns"
  # Namespace handles need a private mount to live on.
  if ! mountpoint -q "$RUN/ns"; then
    mount --bind "$RUN/ns" "$RUN/ns"
    mount --make-private "$RUN/ns"
  fi
  [ -f "$STATE/ip_forward.orig" ] || sysctl -n net.ipv4.ip_forward >"$STATE/ip_forward.orig"
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$BRIDGE_IP/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
  fi
  # The host's only IPv6 address in the lab: on the bridge, for kubectl and
  # the tests' view of nodes. The host's IPv6 forwarding is left alone.
  if dual_stack; then ip addr replace "$BRIDGE_IP6/64" dev "$BRIDGE" nodad; fi
  guard_up
  local short ip
  add_node_netns cp "$CP_IP"
  while read -r short _ ip _; do add_node_netns "$short" "$ip"; done < <(workers)
  add_outside_netns
  add_external_netns
  # Routes between pod CIDRs: every namespace reaches each node's pods via that node.
  local target tip tcidr
  for target in cp $(workers | awk '{print $1}'); do
    while read -r short _ tip tcidr; do
      [ "$short" = "$target" ] && continue
      ip -n "$PREFIX-$target" route replace "$tcidr" via "$tip" dev eth0
      if dual_stack; then ip -n "$PREFIX-$target" -6 route replace "$(pod_cidr6 "$short")" via "$(node_ip6 "$short")" dev eth0; fi
    done < <(workers)
  done
  # Host-network pods (the node agent) dial service VIPs such as the API's
  # 10.96.0.1: they need a route for kube-proxy's OUTPUT DNAT to apply (a real
  # node has its default route). It stays on the lab bridge.
  while read -r short _; do
    ip -n "$PREFIX-$short" route replace "$SERVICE_CIDR" dev eth0
    if dual_stack; then ip -n "$PREFIX-$short" -6 route replace "$SERVICE_CIDR6" dev eth0; fi
  done < <(workers)
}

# add_bridge_netns <short> <ip>: network namespace $PREFIX-<short> with
# eth0 on the lab bridge holding <ip>/24 (idempotent).
add_bridge_netns() {
  local ns=$PREFIX-$1 ip=$2
  if ! grep -qw "$ns" <<<"$(ip netns list)"; then ip netns add "$ns"; fi
  if ! ip link show "$ns" >/dev/null 2>&1; then
    ip link add "$ns" type veth peer name eth0 netns "$ns"
    ip link set "$ns" master "$BRIDGE" up
  fi
  ip -n "$ns" link set lo up
  ip -n "$ns" addr replace "$ip/24" dev eth0
  ip -n "$ns" link set eth0 up
}

add_node_netns() {
  local short=$1 ns=$PREFIX-$1
  add_bridge_netns "$short" "$2"
  if dual_stack; then
    # No duplicate address detection in the node (nor for the link-local
    # addresses of interfaces made later, such as cni0): while an address is
    # tentative, the first IPv6 packets through it are lost.
    ip netns exec "$ns" sysctl -qw net.ipv6.conf.default.accept_dad=0 net.ipv6.conf.all.accept_dad=0
    ip -n "$ns" addr replace "$(node_ip6 "$short")/64" dev eth0 nodad
    ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.forwarding=1
  fi
  # Forwarding inside the node namespace only (per-namespace sysctl).
  ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1
}

# add_outside_netns: the client outside the cluster (OUTSIDE_IP, and
# OUTSIDE_IP6 in a dual-stack lab). On the lab bridge only (no default
# route, no forwarding): it reaches what is announced there, such as
# MetalLB's LoadBalancer addresses, and nothing else.
add_outside_netns() {
  add_bridge_netns out "$OUTSIDE_IP"
  if dual_stack; then
    # IPv6 too (MetalLB announces an address of each family); no duplicate
    # address detection, as on the nodes.
    ip netns exec "$PREFIX-out" sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
    ip -n "$PREFIX-out" addr replace "$OUTSIDE_IP6/64" dev eth0 nodad
  fi
}

# add_external_netns: the external service host (EXTERNAL_IP). Unlike the
# outside client it answers pods directly, so it routes each node's pod
# CIDR through that node; it forwards nothing itself.
add_external_netns() {
  local short ip cidr
  add_bridge_netns ext "$EXTERNAL_IP"
  while read -r short _ ip cidr; do
    ip -n "$PREFIX-ext" route replace "$cidr" via "$ip" dev eth0
  done < <(workers)
}

# guard_up drops anything lab-sourced that would leave through the uplink and
# anything from the uplink addressed to the lab. Mangle table: kube-proxy and
# CNI never touch it, so the guard stays first.
# guard_rules [-6]: the rules for IPv4, or with -6 for the IPv6 ranges
# (the IPv6 uplink, when the host has an IPv6 default route).
guard_rules() {
  local up nets net
  if [ "${1:-}" = -6 ]; then
    up=$(uplink_dev -6) nets="$NODE_NET6 $CLUSTER_CIDR6 $SERVICE_CIDR6"
  else
    up=$(uplink_dev) nets="$NODE_NET $CLUSTER_CIDR $SERVICE_CIDR"
  fi
  [ -n "$up" ] || return 0
  for net in $nets; do
    echo "PREROUTING -i $up -d $net"
    echo "FORWARD -o $up -s $net"
    echo "POSTROUTING -o $up -s $net"
  done
}
guard_up() {
  local chain rest
  while read -r chain rest; do
    # shellcheck disable=SC2086
    iptables -w -t mangle -C "$chain" $rest -m comment --comment "$GUARD_COMMENT" -j DROP 2>/dev/null ||
      iptables -w -t mangle -I "$chain" 1 $rest -m comment --comment "$GUARD_COMMENT" -j DROP
  done < <(guard_rules)
  dual_stack || return 0
  while read -r chain rest; do
    # shellcheck disable=SC2086
    ip6tables -w -t mangle -C "$chain" $rest -m comment --comment "$GUARD_COMMENT" -j DROP 2>/dev/null ||
      ip6tables -w -t mangle -I "$chain" 1 $rest -m comment --comment "$GUARD_COMMENT" -j DROP
  done < <(guard_rules -6)
}
# guard_down removes the guard of both families (whatever LAB_DUAL_STACK
# says now: an earlier up may have set the IPv6 one).
guard_down() {
  local rule
  # No rule left (a second down) is not an error: grep finds nothing.
  { iptables-save -t mangle 2>/dev/null | grep -- "--comment $GUARD_COMMENT" || true; } | sed 's/^-A /-D /' |
    while read -r rule; do eval "iptables -w -t mangle $rule" || true; done
  { ip6tables-save -t mangle 2>/dev/null | grep -- "--comment $GUARD_COMMENT" || true; } | sed 's/^-A /-D /' |
    while read -r rule; do eval "ip6tables -w -t mangle $rule" || true; done
}

# ---------------------------------------------------------------------- PKI
# sign <name> <subject> <ext> : key + certificate signed by the lab CA.
sign() {
  local name=$1 subj=$2 ext=$3
  [ -f "$PKI/$name.crt" ] && return 0
  openssl ecparam -name prime256v1 -genkey -noout -out "$PKI/$name.key" 2>/dev/null
  openssl req -new -key "$PKI/$name.key" -subj "$subj" -out "$PKI/$name.csr" 2>/dev/null
  printf '%s\n' "$ext" >"$PKI/$name.ext"
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 3650 -extfile "$PKI/$name.ext" -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$PKI/$name.csr" "$PKI/$name.ext"
}
client_ext="basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"

pki_up() {
  mkdir -p "$PKI"
  if [ ! -f "$PKI/ca.crt" ]; then
    openssl ecparam -name prime256v1 -genkey -noout -out "$PKI/ca.key" 2>/dev/null
    openssl req -x509 -new -key "$PKI/ca.key" -subj "/CN=ambient-lab-ca" -days 3650 \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
      -out "$PKI/ca.crt" 2>/dev/null
  fi
  [ -f "$PKI/sa.key" ] || { openssl ecparam -name prime256v1 -genkey -noout -out "$PKI/sa.key" 2>/dev/null &&
    openssl ec -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null; }
  sign apiserver "/CN=kube-apiserver" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:$CP_IP,IP:$KUBERNETES_SVC_IP,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.$CLUSTER_DOMAIN,DNS:localhost"
  sign admin "/O=system:masters/CN=lab-admin" "$client_ext"
  sign apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "$client_ext"
  sign controller-manager "/CN=system:kube-controller-manager" "$client_ext"
  sign scheduler "/CN=system:kube-scheduler" "$client_ext"
  sign kube-proxy "/CN=system:kube-proxy" "$client_ext"
  local short name ip
  while read -r short name ip _; do
    sign "kubelet-$short" "/O=system:nodes/CN=system:node:$name" "$client_ext"
    sign "kubelet-$short-serving" "/CN=$name" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:$ip,DNS:$name"
  done < <(workers)
}

# write_kubeconfig <file> <cert name>
write_kubeconfig() {
  local file=$1 cert=$2
  write_if_changed "$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: ambient-lab
  cluster:
    server: $APISERVER
    certificate-authority: $PKI/ca.crt
users:
- name: $cert
  user:
    client-certificate: $PKI/$cert.crt
    client-key: $PKI/$cert.key
contexts:
- name: ambient-lab
  context: {cluster: ambient-lab, user: $cert}
current-context: ambient-lab
EOF
}

# ---------------------------------------------------------------- processes
# start_proc <name> <where: cp|wN> <cmd...>: starts a component in the
# namespaces of <where> unless it already runs; records its PID.
start_proc() {
  local name=$1 where=$2; shift 2
  local pidf=$STATE/pids/$name.pid
  if pid_alive "$pidf"; then return 0; fi
  mkdir -p "$STATE/pids"
  if [ "$where" = cp ]; then
    nsenter --net="$(netns_path cp)" -- setsid "$@" </dev/null >>"$LOGS/$name.log" 2>&1 &
  else
    nsenter --mount="$(mntns_path "$where")" --net="$(netns_path "$where")" -- setsid "$@" </dev/null >>"$LOGS/$name.log" 2>&1 &
  fi
  echo $! >"$pidf"
  echo "$1" >"$STATE/pids/$name.exe"
}

cp_up() {
  mkdir -p "$STATE/etcd"
  start_proc etcd cp "$K8S_BIN/etcd" --name lab --data-dir "$STATE/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster lab=http://127.0.0.1:2380 --log-level warn --quota-backend-bytes 2147483648
  wait_for 60 "etcd" in_cp curl -fsS http://127.0.0.1:2379/health 2>/dev/null ||
    wait_for 60 "etcd" grep -q "ready to serve client requests\|serving client traffic" "$LOGS/etcd.log" || die "etcd did not start (see $LOGS/etcd.log)"
  start_proc kube-apiserver cp "$K8S_BIN/kube-apiserver" \
    --etcd-servers=http://127.0.0.1:2379 --bind-address=0.0.0.0 --advertise-address="$CP_IP" --secure-port=6443 \
    --service-cluster-ip-range="$(svc_cidrs)" --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --client-ca-file="$PKI/ca.crt" --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
    --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority="$PKI/ca.crt" --kubelet-preferred-address-types=InternalIP \
    --service-account-issuer="https://kubernetes.default.svc.$CLUSTER_DOMAIN" \
    --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
    --allow-privileged=true --enable-aggregator-routing=true --profiling=false --event-ttl=30m
  wait_for 90 "kube-apiserver /readyz" kubectl --kubeconfig "$KUBECONFIG_FILE" get --raw /readyz ||
    die "kube-apiserver did not become ready (see $LOGS/kube-apiserver.log)"
  say "kube-apiserver ready at $APISERVER"
  write_kubeconfig "$STATE/controller-manager.kubeconfig" controller-manager
  write_kubeconfig "$STATE/scheduler.kubeconfig" scheduler
  start_proc kube-controller-manager cp "$K8S_BIN/kube-controller-manager" \
    --kubeconfig="$STATE/controller-manager.kubeconfig" --authentication-kubeconfig="$STATE/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$STATE/controller-manager.kubeconfig" --bind-address=127.0.0.1 --leader-elect=false \
    --use-service-account-credentials=true --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
    --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
    --allocate-node-cidrs=false --service-cluster-ip-range="$(svc_cidrs)" --cluster-cidr="$(cluster_cidrs)" \
    --controllers='*,-nodeipam,-cloud-node-lifecycle' --profiling=false
  start_proc kube-scheduler cp "$K8S_BIN/kube-scheduler" \
    --kubeconfig="$STATE/scheduler.kubeconfig" --authentication-kubeconfig="$STATE/scheduler.kubeconfig" \
    --authorization-kubeconfig="$STATE/scheduler.kubeconfig" --bind-address=127.0.0.1 --leader-elect=false --profiling=false
}

# ---------------------------------------------------------------- workers
# write_if_changed <file>: stdin to file, untouched when equal (kube-proxy
# exits when its config file is rewritten, even with the same content).
write_if_changed() {
  local f=$1 tmp; tmp=$1.new
  cat >"$tmp"
  if cmp -s "$tmp" "$f"; then rm -f "$tmp"; else mv "$tmp" "$f"; fi
}

node_mounts_up() {
  local short=$1 dir=$STATE/nodes/$1 mnt
  mnt=$(mntns_path "$short")
  if [ -f "$mnt" ] && mountpoint -q "$mnt"; then return 0; fi
  local p
  for p in "${NODE_BIND_PATHS[@]}"; do
    mkdir -p "$dir/fs$p"
    if [ ! -e "$p" ]; then mkdir -p "$p" && echo "$p" >>"$STATE/created-dirs"; fi
  done
  touch "$mnt"
  unshare --mount="$mnt" --propagation private true
  # Private copies of the fixed paths; /run becomes a private tmpfs.
  local script="set -e"
  for p in "${NODE_BIND_PATHS[@]}"; do script+="; mount --bind '$dir/fs$p' '$p'"; done
  script+="; mount -t tmpfs -o size=512m,mode=755 alab-run-$short /run"
  # Shared inside the node (as systemd makes a real node), so HostToContainer
  # mounts such as /var/run/netns see pod namespaces created later. The node's
  # namespace has its own peer groups: nothing propagates to the host.
  script+="; mount --make-rshared /"
  nsenter --mount="$mnt" -- sh -c "$script"
  # CNI plugins come from the distribution; a node agent may add its own here.
  mkdir -p "$dir/fs/opt/cni/bin" "$dir/fs/etc/cni/net.d"
  for p in /usr/lib/cni/*; do ln -sfn "$p" "$dir/fs/opt/cni/bin/$(basename "$p")"; done
  if [ "$(node_cni "$short")" = flannel ]; then cp "$FLANNEL_BIN/flannel" "$dir/fs/opt/cni/bin/flannel"; fi
}

# Each kubelet gets its own cgroup root so pods of different nodes never share
# a hierarchy; created in every v1 hierarchy (and the hybrid unified one).
cgroup_dirs() {
  local short=$1 d
  for d in /sys/fs/cgroup/*/; do
    [ -f "$d/cgroup.procs" ] && echo "${d%/}/$PREFIX-$short"
  done
}
node_cgroups_up() {
  local c parent
  for c in $(cgroup_dirs "$1"); do
    mkdir -p "$c"
    parent=$(dirname "$c")
    if [ -f "$parent/cpuset.cpus" ]; then
      [ -n "$(cat "$c/cpuset.cpus")" ] || cat "$parent/cpuset.cpus" >"$c/cpuset.cpus"
      [ -n "$(cat "$c/cpuset.mems")" ] || cat "$parent/cpuset.mems" >"$c/cpuset.mems"
    fi
  done
}

write_containerd_config() {
  local dir=$1
  write_if_changed "$dir/containerd.toml" <<EOF
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "docker.io/ambient-lab/pause:3.10"
  # Required here: root lacks CAP_SYS_RESOURCE, without it every sandbox fails.
  restrict_oom_score_adj = true
  disable_apparmor = true
  # Pod netns under /var/run/netns, as on a usual node (this node's /run is private).
  netns_mounts_under_state_dir = false
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "/run/containerd/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    # /etc/cni/net.d and /opt/cni/bin are this node's private lab dirs (bind mounts).
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
EOF
}

# flannel_cni_conflist: what flannel's DaemonSet installs on a node (its
# install-cni step, kube-flannel's cni-conf.json): the flannel plugin, which
# delegates to bridge + host-local with the subnet flanneld leased, and
# portmap. ipMasq off as on the bridge nodes: pods keep their addresses
# across nodes (flannel would otherwise masquerade towards other nodes' pods).
flannel_cni_conflist() {
  cat <<EOF
{
  "name": "cbr0",
  "cniVersion": "0.3.1",
  "plugins": [
    {"type": "flannel", "delegate": {"hairpinMode": true, "isDefaultGateway": true, "ipMasq": false}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
}

write_cni_conflist() {
  local dir=$1 cidr=$2 f=$1/fs/etc/cni/net.d/10-alab.conflist ranges routes
  if [ "$(node_cni "$(basename "$dir")")" = flannel ]; then
    # The pristine copy lets a test rewrite the node's file as flannel's
    # install-cni does on every restart (the node agent must chain in again).
    flannel_cni_conflist >"$dir/flannel-cni.conflist"
    f=$dir/fs/etc/cni/net.d/10-flannel.conflist
    [ -f "$f" ] || { cp "$dir/flannel-cni.conflist" "$f.tmp" && mv "$f.tmp" "$f"; }
    return 0
  fi
  # Written once: a node agent that chains its plugin into this file keeps its edit.
  [ -f "$f" ] && return 0
  # Dual-stack: a second range (the node's IPv6 /64) and default route, so
  # every pod gets an address of each family (IPv4 first: status.podIP).
  ranges="[{\"subnet\": \"$cidr\"}]" routes='{"dst": "0.0.0.0/0"}'
  if dual_stack; then
    ranges+=", [{\"subnet\": \"$(pod_cidr6 "$(basename "$dir")")\"}]" routes+=', {"dst": "::/0"}'
  fi
  local chain=""
  [ -n "${LAB_CNI_CHAIN:-}" ] && chain=",
    ${LAB_CNI_CHAIN}"
  cat >"$f.tmp" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "alab",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [$ranges],
        "routes": [$routes]
      }
    }$chain
  ]
}
EOF
  mv "$f.tmp" "$f"
}

write_kubelet_config() {
  local short=$1 name=$2 ip=$3 dir=$STATE/nodes/$1
  write_if_changed "$dir/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /$PREFIX-$short
failSwapOn: false
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
address: $ip
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
tlsCertFile: $PKI/kubelet-$short-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-$short-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization:
  mode: Webhook
clusterDNS: [$DNS_SVC_IP]
clusterDomain: $CLUSTER_DOMAIN
resolvConf: $LAB/resolv.conf
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "50Mi", nodefs.available: "1%", nodefs.inodesFree: "1%", imagefs.available: "1%"}
serializeImagePulls: false
registerNode: true
syncFrequency: 10s
nodeStatusUpdateFrequency: 5s
fileCheckFrequency: 60s
maxPods: 110
EOF
  write_if_changed "$dir/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection: {kubeconfig: $STATE/kube-proxy.kubeconfig}
hostnameOverride: $name
bindAddress: $ip
clusterCIDR: $(cluster_cidrs)
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: ["$ip/32"$(dual_stack && echo ", \"$(node_ip6 "$short")/128\"")]
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
EOF
}

import_images() {
  local short=$1 dir=$STATE/nodes/$1 tar sum stamp
  mkdir -p "$dir/imported"
  # bin/images (make images) first: the lab's stand-in builds, newer when
  # present, win for the same tag.
  for tar in "$ROOT"/bin/images/*.tar "$IMAGES"/*.tar; do
    [ -f "$tar" ] || continue
    sum=$(stat -c %s-%Y "$tar")
    stamp=$dir/imported/$(basename "$tar").$sum
    [ -f "$stamp" ] && continue
    in_node "$short" ctr -a /run/containerd/containerd.sock -n k8s.io images import --all-platforms "$tar" >>"$LOGS/$short-images.log" 2>&1 ||
      die "importing $tar into $short failed (see $LOGS/$short-images.log)"
    touch "$stamp"
  done
}

node_up() {
  local short=$1 name=$2 ip=$3 cidr=$4 dir=$STATE/nodes/$1
  mkdir -p "$dir"
  node_mounts_up "$short"
  node_cgroups_up "$short"
  write_containerd_config "$dir"
  write_cni_conflist "$dir" "$cidr"
  write_kubelet_config "$short" "$name" "$ip"
  write_kubeconfig "$dir/kubelet.kubeconfig" "kubelet-$short"
  start_proc "$short-containerd" "$short" containerd --config "$dir/containerd.toml" --log-level warn
  wait_for 30 "containerd on $short" in_node "$short" ctr -a /run/containerd/containerd.sock version ||
    die "containerd on $short did not start (see $LOGS/$short-containerd.log)"
  import_images "$short"
  local node_ips=$ip
  if dual_stack; then node_ips+=",$(node_ip6 "$short")"; fi
  start_proc "$short-kubelet" "$short" "$K8S_BIN/kubelet" --config="$dir/kubelet.yaml" \
    --kubeconfig="$dir/kubelet.kubeconfig" --node-ip="$node_ips" --hostname-override="$name" --v=1
  start_proc "$short-kube-proxy" "$short" "$K8S_BIN/kube-proxy" --config="$dir/kube-proxy.yaml"
  say "node $name ($short, $ip, pods $cidr): containerd, kubelet, kube-proxy started"
}

# flannel_up: flanneld on a flannel worker, in the node's namespaces like
# kubelet (as a host-network DaemonSet pod would run it): kube subnet manager
# with its own least-privilege identity (kube-flannel's ClusterRole), the
# node's eth0 on the lab bridge, no masquerade. It writes /run/flannel/subnet.env
# (the node's private /run), which flannel's CNI plugin reads.
flannel_up() {
  local short=$1 name=$2 dir=$STATE/nodes/$1
  kc apply -f - >/dev/null <<'EOF'
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: alab-flannel}
rules:
- {apiGroups: [""], resources: [pods], verbs: [get]}
- {apiGroups: [""], resources: [nodes], verbs: [get, list, watch]}
- {apiGroups: [""], resources: [nodes/status], verbs: [patch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: alab-flannel}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: alab-flannel}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: "system:flannel"}]
EOF
  sign flannel "/CN=system:flannel" "$client_ext"
  write_kubeconfig "$STATE/flannel.kubeconfig" flannel
  printf '{"Network": "%s", "Backend": {"Type": "%s"}}\n' "$CLUSTER_CIDR" "$FLANNEL_BACKEND" >"$dir/flannel-net-conf.json"
  (export NODE_NAME=$name
   start_proc "$short-flanneld" "$short" "$FLANNEL_BIN/flanneld" --kube-subnet-mgr --kubeconfig-file="$STATE/flannel.kubeconfig" \
     --iface=eth0 --ip-masq=false --net-config-path="$dir/flannel-net-conf.json" --subnet-file=/run/flannel/subnet.env)
  wait_for 60 "flannel subnet on $short" in_node "$short" test -s /run/flannel/subnet.env ||
    die "flanneld on $short wrote no subnet (see $LOGS/$short-flanneld.log)"
  say "flanneld on $name ($FLANNEL_BACKEND): $(in_node "$short" grep FLANNEL_SUBNET /run/flannel/subnet.env)"
}

node_ready() { [ "$(kc get node "$1" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]; }

nodes_finish() {
  local short name ip cidr
  while read -r short name ip cidr; do
    wait_for 120 "node $name to register" kc get node "$name" || die "node $name did not register (see $LOGS/$short-kubelet.log)"
    if [ -z "$(kc get node "$name" -o jsonpath='{.spec.podCIDR}')" ]; then
      local cidrs="\"$cidr\""
      if dual_stack; then cidrs+=",\"$(pod_cidr6 "$short")\""; fi
      kc patch node "$name" --type merge -p "{\"spec\":{\"podCIDR\":\"$cidr\",\"podCIDRs\":[$cidrs]}}" >/dev/null
    fi
    kc label node "$name" --overwrite node-role.kubernetes.io/worker= ambient.lab/node="$short" ambient.lab/cni="$(node_cni "$short")" >/dev/null
    # flanneld's kube subnet manager leases the node's podCIDR: start it once set.
    if [ "$(node_cni "$short")" = flannel ]; then flannel_up "$short" "$name"; fi
  done < <(workers)
  while read -r short name _; do
    wait_for 120 "node $name Ready" node_ready "$name" || die "node $name not Ready (see $LOGS/$short-kubelet.log)"
  done < <(workers)
  say "all $LAB_WORKERS worker nodes Ready"
}

addons_up() {
  kc apply -f "$ROOT/test/lab/manifests/coredns.yaml" >/dev/null
  wait_for 120 "CoreDNS available" kc -n kube-system wait --for=condition=available deploy/coredns --timeout=2s ||
    die "CoreDNS did not become available"
  say "CoreDNS available at $DNS_SVC_IP"
}

import_all() {
  [ -f "$STATE/.up" ] || die "the lab is not up"
  local short
  for short in $(workers | awk '{print $1}'); do import_images "$short"; done
  say "images imported into every node"
}

# tag_all <src> <dst>: gives an imported image a second name on every node
# (the e2e upgrade test rolls ztunnel to "a new tag" this way).
# full_ref <image>: the name containerd stores for a Docker-style short
# reference (ambient/ztunnel:dev -> docker.io/ambient/ztunnel:dev), as the CRI
# resolves it; ctr does not.
full_ref() {
  local first=${1%%/*}
  case $1 in
    */*) if [[ $first == *.* || $first == *:* || $first == localhost ]]; then echo "$1"; else echo "docker.io/$1"; fi ;;
    *) echo "docker.io/library/$1" ;;
  esac
}

tag_all() {
  [ $# = 2 ] || die "usage: lab.sh tag <image> <new name>"
  local short src dst
  src=$(full_ref "$1") dst=$(full_ref "$2")
  for short in $(workers | awk '{print $1}'); do
    in_node "$short" ctr -a /run/containerd/containerd.sock -n k8s.io images tag --force "$src" "$dst" >/dev/null ||
      die "tagging $src as $dst on $short failed"
  done
}

# signal_container NODE ID SIG: containerd kills the task, as when a process
# dies on its own (the kubelet then restarts the container).
signal_container() {
  [ $# = 3 ] || die "usage: lab.sh signal <node name> <container id> <signal>"
  local short
  short=$(workers | awk -v n="$1" '$2 == n { print $1 }')
  [ -n "$short" ] || die "no lab node named $1"
  in_node "$short" ctr -a /run/containerd/containerd.sock -n k8s.io tasks kill -s "$3" "${2#containerd://}"
}

# node_short NAME: the short name (w1, ...) of lab node NAME.
node_short() {
  local short
  short=$(workers | awk -v n="$1" '$2 == n { print $1 }')
  [ -n "$short" ] || die "no lab node named $1"
  echo "$short"
}

# pod_exec NODE ID CMD...: runs a host command in the network namespace of
# container ID (its pod's), as the pod's own processes are: the pod's
# redirection rules apply. The chaos load uses it so that restarting the
# API server or etcd does not cut the load tools' kubectl exec streams.
pod_exec() {
  [ $# -ge 3 ] || die "usage: lab.sh podexec <node name> <container id> <cmd...>"
  local short pid
  short=$(node_short "$1")
  pid=$(in_node "$short" ctr -a /run/containerd/containerd.sock -n k8s.io tasks ls | awk -v id="${2#containerd://}" '$1 == id { print $2 }')
  [ -n "$pid" ] || die "no running task $2 on $1"
  shift 2
  exec nsenter -t "$pid" -n -- "$@"
}

# restart_cp etcd|kube-apiserver: stops a control-plane process and starts
# it again (cp_up starts only what is not running), waiting until ready.
restart_cp() {
  case ${1:-} in etcd | kube-apiserver) ;; *) die "usage: lab.sh restart etcd|kube-apiserver" ;; esac
  kill_recorded "$1"
  cp_up
}

# partition on|off NODE NODE: drops every frame between the two nodes'
# ports on the lab bridge (an nftables bridge table, alab_partition), both
# ways; the control plane and the other nodes still reach both.
PARTITION_TABLE=alab_partition
partition() {
  case ${1:-} in
    on)
      [ $# = 3 ] || die "usage: lab.sh partition on <node> <node>"
      local a b
      a=$PREFIX-$(node_short "$2"); b=$PREFIX-$(node_short "$3")
      nft -f - <<EOF
table bridge $PARTITION_TABLE {
  chain forward {
    type filter hook forward priority 0; policy accept;
    iifname "$a" oifname "$b" drop
    iifname "$b" oifname "$a" drop
  }
}
EOF
      ;;
    off) nft delete table bridge "$PARTITION_TABLE" 2>/dev/null || true ;;
    *) die "usage: lab.sh partition on <node> <node> | off" ;;
  esac
}

# ---------------------------------------------------------------------- up
# refuse_foreign_lab: the lab's names (alab-*, /run/alab) are machine-wide, so
# only one checkout's lab can be up at a time. Coming up over another
# checkout's lab would reuse its node mount namespaces with none of this
# checkout's node directories, and fail obscurely; say whose lab it is instead.
# other_owner prints the checkout whose lab is up, when it is not this one.
other_owner() {
  local owner
  owner=$(cat "$RUN/owner" 2>/dev/null) && [ -n "$owner" ] && [ "$owner" != "$ROOT" ] && echo "$owner"
}

refuse_foreign_lab() {
  local owner
  if owner=$(other_owner); then
    die "a lab from $owner is up on this machine; stop it first: sudo $owner/test/lab/lab.sh down"
  fi
  if [ ! -f "$STATE/.up" ] && { ip netns list | grep -q "^$PREFIX-" || compgen -G "$RUN/ns/*.mnt" >/dev/null; }; then
    die "a lab not started from this checkout is up on this machine (netns $PREFIX-*, $RUN/ns); stop it with the lab.sh that started it (lab.sh down)"
  fi
}

up() {
  need_root
  refuse_foreign_lab
  mkdir -p "$STATE" "$LOGS" "$RUN"
  echo "$ROOT" >"$RUN/owner"
  if [ ! -f "$STATE/.up" ]; then rm -f "$LOGS"/*.log; fi
  say "lab up: $LAB_WORKERS workers, state in $STATE, logs in $LOGS"
  # A lab keeps the address families it came up with.
  if [ -f "$STATE/.up" ] && [ "$(cat "$STATE/dual-stack" 2>/dev/null || echo 0)" != "$LAB_DUAL_STACK" ]; then
    die "the lab is up with LAB_DUAL_STACK=$(cat "$STATE/dual-stack" 2>/dev/null || echo 0); run test/lab/lab.sh down first to change it"
  fi
  ensure_packages
  ensure_binaries
  say "binaries and images ready"
  touch "$STATE/.up"
  echo "$LAB_DUAL_STACK" >"$STATE/dual-stack"
  net_up
  say "network: bridge $BRIDGE $NODE_NET$(dual_stack && echo " $NODE_NET6"), netns $(ip netns list | awk '{print $1}' | grep "^$PREFIX-" | tr '\n' ' ')"
  pki_up
  write_kubeconfig "$KUBECONFIG_FILE" admin
  write_kubeconfig "$STATE/kube-proxy.kubeconfig" kube-proxy
  printf 'nameserver %s\nsearch default.svc.%s svc.%s %s\noptions ndots:5\n' "$DNS_SVC_IP" "$CLUSTER_DOMAIN" "$CLUSTER_DOMAIN" "$CLUSTER_DOMAIN" >"$LAB/resolv.conf"
  cp_up
  say "control plane up (etcd, kube-apiserver, controller-manager, scheduler)"
  local pids=() short name ip cidr
  while read -r short name ip cidr; do
    node_up "$short" "$name" "$ip" "$cidr" &
    pids+=($!)
  done < <(workers)
  for p in "${pids[@]}"; do wait "$p" || die "a worker failed to start"; done
  nodes_finish
  addons_up
  say "lab is up. Use it with:  export KUBECONFIG=$KUBECONFIG_FILE"
}

# -------------------------------------------------------------------- down
# kill_recorded <name>: stops a recorded process if it is still the binary we started.
kill_recorded() {
  local pidf=$STATE/pids/$1.pid exe pid
  [ -f "$pidf" ] || return 0
  pid=$(cat "$pidf"); exe=$(cat "$STATE/pids/$1.exe" 2>/dev/null || true)
  if kill -0 "$pid" 2>/dev/null && [ "$(readlink -f "/proc/$pid/exe" 2>/dev/null)" = "$(readlink -f "$(command -v "$exe" || echo "$exe")")" ]; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && { kill -TERM "$pid" 2>/dev/null; sleep 1; } # the apiserver may want a second TERM
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidf" "$STATE/pids/$1.exe"
}

# Processes inside a node's cgroup root are pods the lab's kubelet started.
kill_node_cgroups() {
  local c pids
  for c in $(cgroup_dirs "$1"); do
    [ -d "$c" ] || continue
    pids=$(find "$c" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u || true)
    # shellcheck disable=SC2086
    [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
  done
}

# Processes sharing a node's mount namespace (containerd shims) were started by
# the lab's containerd on that node.
kill_node_mntns() {
  local mnt=$1 ino p
  [ -f "$mnt" ] && mountpoint -q "$mnt" || return 0
  ino=$(stat -L -c %i "$mnt" 2>/dev/null) || return 0
  for p in /proc/[0-9]*; do
    [ "$(stat -L -c %i "$p/ns/mnt" 2>/dev/null)" = "$ino" ] && kill -KILL "${p#/proc/}" 2>/dev/null || true
  done
}

remove_cgroups() {
  local c
  for c in $(cgroup_dirs "$1"); do
    [ -d "$c" ] || continue
    find "$c" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
}

down() {
  need_root
  local owner
  if owner=$(other_owner) && [ -z "${LAB_FORCE_DOWN:-}" ]; then
    die "the lab on this machine is $owner's, not this checkout's; stop it with sudo $owner/test/lab/lab.sh down (LAB_FORCE_DOWN=1 removes it by name if that checkout is gone)"
  fi
  say "lab down"
  local shorts; shorts=$(workers | awk '{print $1}')
  # Nodes also listed by recorded state, in case LAB_WORKERS changed since up.
  [ -d "$STATE/nodes" ] && shorts=$(printf '%s\n' $shorts $(ls "$STATE/nodes") | sort -u)
  local s
  for s in $shorts; do kill_recorded "$s-kubelet"; kill_recorded "$s-kube-proxy"; kill_recorded "$s-flanneld"; done
  for s in $shorts; do kill_node_cgroups "$s"; done
  for s in $shorts; do kill_recorded "$s-containerd"; kill_node_mntns "$(mntns_path "$s")"; done
  say "workers stopped"
  for c in kube-scheduler kube-controller-manager kube-apiserver etcd; do kill_recorded "$c"; done
  say "control plane stopped"
  partition off
  sleep 0.5
  for s in $shorts; do
    kill_node_cgroups "$s"; remove_cgroups "$s"
    local mnt; mnt=$(mntns_path "$s")
    if [ -f "$mnt" ]; then umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true; rm -f "$mnt"; fi
  done
  for s in cp out ext $shorts; do
    ip netns del "$PREFIX-$s" 2>/dev/null || true
    ip link del "$PREFIX-$s" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  guard_down
  if [ -f "$STATE/ip_forward.orig" ]; then sysctl -qw net.ipv4.ip_forward="$(cat "$STATE/ip_forward.orig")"; fi
  if mountpoint -q "$RUN/ns" 2>/dev/null; then umount "$RUN/ns" 2>/dev/null || umount -l "$RUN/ns" 2>/dev/null || true; fi
  rm -f "$RUN/owner" # ours, or removed by name (LAB_FORCE_DOWN)
  rmdir "$RUN/ns" "$RUN" 2>/dev/null || true
  if [ -f "$STATE/created-dirs" ]; then
    sort -ru "$STATE/created-dirs" | while read -r d; do rmdir "$d" 2>/dev/null || true; done
  fi
  rm -rf "$STATE"
  say "lab removed (logs of this run kept in $LOGS)"
}

# ------------------------------------------------------------------ status
status() {
  local f name pid rss total=0
  echo "processes:"
  for f in "$STATE"/pids/*.pid; do
    [ -f "$f" ] || continue
    name=$(basename "$f" .pid)
    if pid_alive "$f"; then
      pid=$(cat "$f"); rss=$(awk '/VmRSS/ {print int($2 / 1024)}' "/proc/$pid/status")
      total=$((total + rss))
      printf '  %-26s pid %-7s rss %4s MiB\n' "$name" "$pid" "$rss"
    else
      printf '  %-26s NOT RUNNING\n' "$name"
    fi
  done
  local short shims pods
  for short in $(workers | awk '{print $1}'); do
    shims=$(mntns_rss "$(mntns_path "$short")")
    pods=$(cgroup_rss "$short")
    printf '  %-26s rss %4s MiB (containerd shims %s MiB, pods %s MiB)\n' "$short-pods+shims" "$((shims + pods))" "$shims" "$pods"
    total=$((total + shims + pods))
  done
  echo "  lab total rss: $total MiB"
  [ -f "$KUBECONFIG_FILE" ] || return 0
  echo; kc get nodes -o wide 2>&1 || true
  echo; kc get pods -A -o wide 2>&1 || true
}

# mntns_rss: MiB of processes in a node's mount namespace other than the
# recorded components (containerd shims).
mntns_rss() {
  local mnt=$1 ino p sum=0 recorded
  [ -f "$mnt" ] && mountpoint -q "$mnt" || { echo 0; return; }
  ino=$(stat -L -c %i "$mnt")
  recorded=" $(cat "$STATE"/pids/*.pid 2>/dev/null | tr '\n' ' ') "
  for p in /proc/[0-9]*; do
    [ "$(stat -L -c %i "$p/ns/mnt" 2>/dev/null)" = "$ino" ] || continue
    [[ $recorded == *" ${p#/proc/} "* ]] && continue
    sum=$((sum + $(awk '/VmRSS/ {print $2}' "$p/status" 2>/dev/null || echo 0)))
  done
  echo $((sum / 1024))
}

# cgroup_rss: MiB of resident memory of a node's pods (memory cgroup).
cgroup_rss() {
  local f=/sys/fs/cgroup/memory/$PREFIX-$1/memory.stat
  [ -f "$f" ] && awk '$1 == "total_rss" { print int($2 / 1048576) }' "$f" || echo 0
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  env) echo "export KUBECONFIG=$KUBECONFIG_FILE" ;;
  images) import_all ;;
  tag) shift; tag_all "$@" ;;
  signal) shift; signal_container "$@" ;;
  podexec) shift; pod_exec "$@" ;;
  restart) shift; restart_cp "$@" ;;
  partition) shift; partition "$@" ;;
  *) echo "usage: $0 up|down|status|env|images|tag|signal|podexec|restart|partition" >&2; exit 2 ;;
esac
