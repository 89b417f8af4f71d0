#!/usr/bin/env bash
# `make demo`: builds what it needs, brings the lab up, installs the mesh and
# replays the seeds' journey (Istio "ztunnel" guide, north-south ingress
# from outside the cluster, a sidecar client beside ambient) step by step, then
# prints a PASS/FAIL/SKIPPED summary. Steps whose component does not exist yet
# say so plainly; nothing is faked. The lab stays up for exploration.
set -uo pipefail
source "$(dirname "$0")/lib.sh"
export KUBECONFIG=$KUBECONFIG_FILE PATH=$ROOT/bin:$PATH
NS=ambient-demo
MESH_NS=ambient-system
DEMO_T0=$SECONDS

declare -a RESULTS=()
result() { RESULTS+=("$1|$2|$3"); printf '  => %s%s\n' "$1" "${3:+: $3}"; }
pass() { result PASS "$CURRENT" "${1:-}"; }
fail() { result FAIL "$CURRENT" "$1"; }
skip() { result SKIPPED "$CURRENT" "$1"; }
step() { CURRENT=$1; echo; echo "=== [$(elapsed)] $1"; }
# show <command>: prints the command as a user would type it, then runs it.
show() { echo "\$ $*"; bash -c "$*"; }
# out <command>: runs quietly, returns its output.
out() { bash -c "$*" 2>&1; }

# ------------------------------------------------------------------ prepare
step "Build and bring the lab up"
"$ROOT/test/lab/build.sh" k8s coredns metallb images ambientctl || { fail "build failed"; exit 1; }
"$ROOT/test/lab/lab.sh" up || { fail "lab did not come up (logs: $LOGS)"; exit 1; }
pass "$(kc get nodes --no-headers | wc -l) nodes Ready"

step "Install the mesh (operator by kubectl apply, AmbientMesh sample)"
"$ROOT/test/lab/install.sh"
# shellcheck disable=SC1091
source "$STATE/mesh.env"
echo "  operator: $OPERATOR"
echo "  ztunnel: ${ZTUNNEL:-not installed}"
echo "  node agent: ${NODE_AGENT:-not installed}"
echo "  waypoint: ${WAYPOINT_IMAGE:-not installed}"
echo "  MetalLB: ${METALLB:-not installed}"
MESH_REASON=""
[ "$OPERATOR" = ready ] || MESH_REASON="operator not available yet: $OPERATOR"
[ -n "$MESH_REASON" ] || [ "${ZTUNNEL:-}" = ready ] || MESH_REASON="ztunnel not available yet: ${ZTUNNEL:-}"
[ -n "$MESH_REASON" ] || [ "${NODE_AGENT:-}" = ready ] || MESH_REASON="node agent not available yet: ${NODE_AGENT:-}"
if [ -z "$MESH_REASON" ]; then pass "ztunnel and node agent running on every node"; else skip "$MESH_REASON"; fi
mesh_ok() { [ -z "$MESH_REASON" ]; }

# -------------------------------------------------------------- the journey
step "Deploy httpbin, sleep x2 and notsleep in $NS (no mesh yet)"
kc delete ns "$NS" client-a --ignore-not-found --wait=true >/dev/null 2>&1
show "kubectl create ns $NS"
show "kubectl apply -f test/lab/manifests/apps/httpbin.yaml -n $NS"
show "kubectl apply -f test/lab/manifests/apps/sleep.yaml -n $NS"
show "kubectl apply -f test/lab/manifests/apps/notsleep.yaml -n $NS"
show "kubectl scale deployment sleep --replicas=2 -n $NS"
show "kubectl wait -n $NS --for=condition=available deploy --all --timeout=90s" >/dev/null
show "kubectl get pods -n $NS -o wide"
show "kubectl get svc httpbin -n $NS"
if [ "$(kc get pods -n "$NS" --no-headers 2>/dev/null | grep -c Running)" = 4 ]; then pass "4 pods running"; else fail "pods not running"; fi

step "curl works before the mesh"
# Available pods become Service endpoints once kube-proxy has synced: retry
# a refused connection for a few seconds.
for _ in $(seq 15); do
  o=$(out "kubectl exec deploy/sleep -n $NS -- curl -s -m 5 httpbin:8000 | grep title -m 1")
  [[ $o == *"<title>httpbin.org</title>"* ]] && break
  sleep 2
done
echo "\$ kubectl exec deploy/sleep -n $NS -- curl httpbin:8000 -s | grep title -m 1"; echo "$o"
if [[ $o == *"<title>httpbin.org</title>"* ]]; then pass; else fail "no httpbin page"; fi

pod_fingerprint() { kc get pods -n "$NS" -o jsonpath='{range .items[*]}{.metadata.uid}:{.status.containerStatuses[0].restartCount}{"\n"}{end}' | sort; }

step "Enable ambient for the namespace; pods are not restarted"
if mesh_ok; then
  before=$(pod_fingerprint)
  show "kubectl label namespace $NS istio.io/dataplane-mode=ambient --overwrite"
  captured() { [ "$(kc get pods -n "$NS" -o jsonpath='{range .items[*]}{.metadata.annotations.ambient\.istio\.io/redirection}{"\n"}{end}' | grep -c enabled)" = 4 ]; }
  wait_for 60 "pods captured" captured || echo "  (not every pod carries ambient.istio.io/redirection=enabled)"
  show "kubectl get pods -n $NS"
  if [ "$before" = "$(pod_fingerprint)" ] && captured; then pass "same pod UIDs, 0 restarts, all 4 captured"
  elif [ "$before" != "$(pod_fingerprint)" ]; then fail "pods were restarted or replaced"
  else fail "pods were not captured (no ambient.istio.io/redirection=enabled annotation)"; fi
else
  skip "$MESH_REASON"
fi

step "curl still works in ambient mode, through ztunnel (log lines)"
if mesh_ok; then
  show "kubectl -n $NS exec deploy/sleep -- curl -s -I -m 5 --repeat 10 http://httpbin:8000/ | grep -c 'HTTP/1.1 200'"
  logs=$(out "kubectl -n $MESH_NS logs -l app=ztunnel --tail=400 | grep -E 'inbound|outbound'")
  echo "\$ kubectl -n $MESH_NS logs -l app=ztunnel | grep -E 'inbound|outbound'"; echo "$logs" | tail -6
  if [ -n "$logs" ]; then pass; else fail "no inbound/outbound lines in ztunnel logs"; fi
else
  skip "$MESH_REASON"
fi

step "ambientctl proxy-config workloads and secrets"
if mesh_ok; then
  ZT=$(kc get pods -n "$MESH_NS" -l app=ztunnel -o jsonpath='{.items[0].metadata.name}')
  wl=$(out "ambientctl proxy-config workloads $ZT.$MESH_NS"); echo "\$ ambientctl proxy-config workloads $ZT.$MESH_NS"; echo "$wl"
  sec=$(out "ambientctl proxy-config secrets $ZT.$MESH_NS"); echo "\$ ambientctl proxy-config secrets $ZT.$MESH_NS"; echo "$sec"
  if grep -q "httpbin.*$NS.*HBONE" <<<"$wl" && grep -q "spiffe://" <<<"$sec"; then pass
  else fail "httpbin not listed as HBONE, or no certificates"; fi
else
  skip "$MESH_REASON"
fi

step "Scale httpbin to 2: ztunnel balances connections round robin"
show "kubectl -n $NS scale deployment httpbin --replicas=2; kubectl wait --for condition=available deployment/httpbin -n $NS --timeout=60s"
hosts=$(out "kubectl -n $NS exec deploy/sleep -- curl -s -m 5 --repeat 10 http://httpbin:8000/hostname")
echo "\$ kubectl -n $NS exec deploy/sleep -- curl -s --repeat 10 http://httpbin:8000/hostname | sort | uniq -c"; echo "$hosts" | sort | uniq -c
if ! mesh_ok; then skip "$MESH_REASON (without the mesh kube-proxy balances; answered by $(echo "$hosts" | sort -u | grep -c httpbin) pods)"
elif [ "$(echo "$hosts" | sort -u | grep -c httpbin)" = 2 ]; then pass "both replicas answered"
else fail "only $(echo "$hosts" | sort -u | grep -c httpbin) replica answered"; fi

# curl_code <deploy> <ns> <url>: curl's exit code from inside a pod.
curl_code() { kc exec "deploy/$1" -n "$2" -- curl -s -m 5 -o /dev/null "$3" >/dev/null 2>&1; echo $?; }

step "L4 AuthorizationPolicy: sleep allowed, notsleep refused"
if mesh_ok; then
  show "kubectl apply -n $NS -f test/lab/manifests/policy/allow-sleep-l4.yaml"
  sleep 2
  a=$(curl_code sleep "$NS" httpbin:8000); b=$(curl_code notsleep "$NS" httpbin:8000)
  echo "\$ kubectl exec deploy/sleep -n $NS -- curl httpbin:8000 -s   # exit $a"
  echo "\$ kubectl exec deploy/notsleep -n $NS -- curl httpbin:8000 -s   # exit $b"
  show "kubectl logs -n $MESH_NS -l app=ztunnel --tail=200 | grep RBAC | tail -2"
  if [ "$a" = 0 ] && [ "$b" != 0 ]; then pass "notsleep refused with curl exit code $b"; else fail "sleep exit $a, notsleep exit $b"; fi
else
  skip "$MESH_REASON"
fi

step "L7 rule without a waypoint: both refused (fail closed)"
if mesh_ok; then
  show "kubectl apply -n $NS -f test/lab/manifests/policy/allow-sleep-l7.yaml"
  sleep 2
  a=$(curl_code sleep "$NS" httpbin:8000); b=$(curl_code notsleep "$NS" httpbin:8000)
  echo "  sleep: exit $a, notsleep: exit $b"
  if [ "$a" != 0 ] && [ "$b" != 0 ]; then pass; else fail "sleep exit $a, notsleep exit $b"; fi
  show "kubectl delete AuthorizationPolicy allow-sleep-to-httpbin -n $NS"
else
  skip "$MESH_REASON"
fi

step "Client outside the mesh: PERMISSIVE allows, STRICT refuses"
show "kubectl create namespace client-a; kubectl apply -f test/lab/manifests/apps/sleep.yaml -n client-a; kubectl wait --for condition=available deployment/sleep -n client-a --timeout=60s" >/dev/null
url=httpbin.$NS.svc.cluster.local:8000
c0=$(curl_code sleep client-a "$url"); echo "  default (no PeerAuthentication): exit $c0"
if mesh_ok; then
  show "kubectl apply -n $NS -f test/lab/manifests/policy/peerauth-strict.yaml"; sleep 2
  c1=$(curl_code sleep client-a "$url"); echo "  STRICT: exit $c1"
  show "kubectl apply -n $NS -f test/lab/manifests/policy/peerauth-permissive.yaml"; sleep 2
  c2=$(curl_code sleep client-a "$url"); echo "  PERMISSIVE: exit $c2"
  kc delete peerauthentication peerauth -n "$NS" --ignore-not-found >/dev/null
  if [ "$c0" = 0 ] && [ "$c1" != 0 ] && [ "$c2" = 0 ]; then pass; else fail "default exit $c0, STRICT exit $c1, PERMISSIVE exit $c2"; fi
else
  skip "$MESH_REASON"
fi

step "Waypoint with the seeds' HTTPRoute (echo -> echo-v1)"
show "kubectl apply -n $NS -f test/lab/manifests/apps/echo.yaml; kubectl wait -n $NS --for=condition=available deploy/echo-v1 deploy/echo-v2 --timeout=60s" >/dev/null
if ! mesh_ok; then
  skip "$MESH_REASON"
elif [ "${WAYPOINT_IMAGE:-}" != ready ]; then
  skip "waypoint not available yet: ${WAYPOINT_IMAGE:-unknown}"
else
  show "ambientctl waypoint apply -n $NS --wait --timeout 90s"
  show "kubectl apply -n $NS -f test/lab/manifests/policy/httproute-echo.yaml"; sleep 3
  answers=$(out "kubectl -n $NS exec deploy/sleep -- curl -s -m 5 --repeat 10 http://echo/hostname")
  echo "$answers" | sort | uniq -c
  if [ -n "$answers" ] && ! grep -qv '^echo-v1-' <<<"$answers"; then pass "all 10 answered by echo-v1"
  else fail "answers not all from echo-v1"; fi
fi

step "North-south: the seeds' Gateway and HTTPRoute, curl from outside the cluster via MetalLB"
if ! mesh_ok; then
  skip "$MESH_REASON"
elif [ "${WAYPOINT_IMAGE:-}" != ready ] || [ "${METALLB:-}" != ready ]; then
  skip "ingress gateway or MetalLB not available: waypoint image ${WAYPOINT_IMAGE:-unknown}, MetalLB ${METALLB:-unknown}"
else
  kc create namespace istio-system >/dev/null 2>&1 || true
  show "kubectl apply -f test/lab/manifests/ingress/gateway.yaml"
  show "kubectl apply -n $NS -f test/lab/manifests/ingress/httproute.yaml"
  show "kubectl wait -n istio-system --for=condition=Programmed gateway/httpbin-gateway --timeout=180s" >/dev/null
  show "kubectl get service httpbin-gateway-istio -n istio-system"
  INGRESS_HOST=$(kc -n istio-system get service httpbin-gateway-istio -o jsonpath='{.status.loadBalancer.ingress[0].ip}')
  echo "\$ export INGRESS_HOST=\$(kubectl -n istio-system get service httpbin-gateway-istio -o jsonpath='{.status.loadBalancer.ingress[0].ip}')"
  echo "\$ echo \"\$INGRESS_HOST\""; echo "$INGRESS_HOST"
  for _ in $(seq 20); do
    o=$(outside curl -s -m 5 "$INGRESS_HOST" 2>&1 | grep title -m 1)
    [[ $o == *"<title>httpbin.org</title>"* ]] && break
    sleep 2
  done
  echo "\$ curl \"\$INGRESS_HOST\" -s | grep title -m 1     # from $PREFIX-out, a host outside the cluster"; echo "$o"
  show "ambientctl gateway list -A"
  if [[ $o == *"<title>httpbin.org</title>"* ]]; then pass "httpbin's page through the ingress gateway at $INGRESS_HOST"
  else fail "no httpbin page from outside at ${INGRESS_HOST:-<no address>}"; fi
fi

step "Sidecar mode beside ambient: a sidecar client (client-b) calls the ambient httpbin"
if ! mesh_ok; then
  skip "$MESH_REASON"
else
  kc delete ns client-b --ignore-not-found --wait=true >/dev/null 2>&1
  show "kubectl create namespace client-b"
  show "kubectl label namespace client-b istio-injection=enabled"
  show "kubectl apply -f test/lab/manifests/apps/sleep.yaml -n client-b"
  show "kubectl wait --for condition=available deployment/sleep -n client-b --timeout=120s" >/dev/null
  show "kubectl get pods -n client-b -o jsonpath='{.items[0].spec.initContainers[*].name}'"; echo
  for _ in $(seq 15); do
    o=$(out "kubectl exec deploy/sleep -n client-b -- curl -s -m 5 httpbin.$NS.svc.cluster.local:8000 | grep title -m 1")
    [[ $o == *"<title>httpbin.org</title>"* ]] && break
    sleep 2
  done
  echo "\$ kubectl exec deploy/sleep -n client-b -- curl httpbin.$NS.svc.cluster.local:8000 -s | grep title -m 1"; echo "$o"
  # The proxy that terminates the sidecar's HBONE names its identity: the
  # destination node's ztunnel, or, since the waypoint step above put
  # $NS behind a namespace waypoint, that waypoint (sidecars honour
  # waypoints as Istio's do).
  if kc -n "$NS" get deploy waypoint >/dev/null 2>&1; then
    server="waypoint" logcmd="kubectl -n $NS logs deploy/waypoint --tail=400"
  else
    server="ztunnel" logcmd="kubectl -n $MESH_NS logs -l app=ztunnel --tail=400"
  fi
  logs=$(out "$logcmd | grep 'ns/client-b/sa/sleep'")
  echo "\$ ${logcmd% --tail=*} | grep ns/client-b/sa/sleep"; echo "$logs" | tail -2
  if [[ $o == *"<title>httpbin.org</title>"* ]] && [ -n "$logs" ]; then pass "sidecar client served over HBONE with its own identity, named by the $server"
  else fail "no page, or no $server line naming the sidecar's identity"; fi
fi

# ------------------------------------------------------------------ summary
echo
echo "=== Summary (demo wall time $((SECONDS - DEMO_T0))s)"
np=0; nf=0; ns=0
for r in "${RESULTS[@]}"; do
  IFS='|' read -r res name why <<<"$r"
  printf '  %-8s %s%s\n' "$res" "$name" "${why:+ ($why)}"
  case $res in PASS) np=$((np + 1)) ;; FAIL) nf=$((nf + 1)) ;; *) ns=$((ns + 1)) ;; esac
done
echo "  $np passed, $nf failed, $ns skipped"
echo
echo "The lab is still running:  export KUBECONFIG=$KUBECONFIG_FILE; kubectl get pods -A"
echo "Tear it down with:         make lab-down   (test/lab/lab.sh down)"
[ "$nf" = 0 ]
