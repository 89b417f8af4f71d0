package authz

import (
	"net/http"
	"net/netip"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/ambientmesh/ambient/proxylib/identity"
)

func policy(t *testing.T, y string) *Policy {
	t.Helper()
	js, err := yaml.YAMLToJSON([]byte(y))
	if err != nil {
		t.Fatal(err)
	}
	p, err := Decode(js)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

var (
	sleep    = identity.MustParse("spiffe://cluster.local/ns/ambient-demo/sa/sleep")
	notsleep = identity.MustParse("spiffe://cluster.local/ns/ambient-demo/sa/notsleep")
	other    = identity.MustParse("spiffe://cluster.local/ns/other/sa/client")
)

func httpReq(peer identity.Identity, method, path string, hdr ...string) *Request {
	h := http.Header{}
	for i := 0; i+1 < len(hdr); i += 2 {
		h.Add(hdr[i], hdr[i+1])
	}
	return &Request{
		Peer: peer, SourceIP: netip.MustParseAddr("10.0.1.5"), RemoteIP: netip.MustParseAddr("10.0.1.5"),
		DestIP: netip.MustParseAddr("10.0.2.9"), DestPort: 8000,
		HTTP: true, Method: method, Path: path, Host: "httpbin.ambient-demo.svc.cluster.local:8000", Header: h,
	}
}

func tcpReq(peer identity.Identity) *Request {
	r := httpReq(peer, "", "")
	r.HTTP = false
	return r
}

// The seeds' L7 policy: GET allowed only for sleep.
const seedPolicy = `
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: allow-sleep-to-httpbin, namespace: ambient-demo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/ambient-demo/sa/sleep]}}]
    to: [{operation: {methods: [GET]}}]
`

func TestEvaluate(t *testing.T) {
	seed := policy(t, seedPolicy)
	denyAdmin := policy(t, `
metadata: {name: deny-admin, namespace: ambient-demo}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin*", "*/secret", "/exact"]}}]
  - when: [{key: "request.headers[x-bad]", values: ["*"]}]
`)
	allowAll := policy(t, `
metadata: {name: allow-all, namespace: ambient-demo}
spec: {rules: [{}]}
`)
	allowNothing := policy(t, `
metadata: {name: allow-nothing, namespace: ambient-demo}
spec: {action: ALLOW}
`)
	denyNoRules := policy(t, `
metadata: {name: deny-nothing, namespace: ambient-demo}
spec: {action: DENY}
`)
	hostsPorts := policy(t, `
metadata: {name: hp, namespace: ambient-demo}
spec:
  rules:
  - to: [{operation: {hosts: ["HTTPBIN.ambient-demo.svc.cluster.local"], ports: ["8000"], notMethods: [DELETE]}}]
    from: [{source: {namespaces: [ambient-demo], notPrincipals: ["*/sa/notsleep"], ipBlocks: ["10.0.0.0/16"]}}]
    when:
    - {key: "request.headers[x-env]", values: ["prod", "stag*"], notValues: ["staging-bad"]}
    - {key: destination.port, values: ["8000"]}
    - {key: source.namespace, notValues: [kube-system]}
`)
	jwtAllow := policy(t, `
metadata: {name: jwt, namespace: ambient-demo}
spec:
  rules: [{from: [{source: {requestPrincipals: ["*"]}}]}]
`)
	jwtDeny := policy(t, `
metadata: {name: jwt-deny, namespace: ambient-demo}
spec:
  action: DENY
  rules: [{from: [{source: {notRequestPrincipals: ["*"]}}], to: [{operation: {paths: ["/private*"]}}]}]
`)
	unknownKey := policy(t, `
metadata: {name: unknown, namespace: ambient-demo}
spec:
  action: DENY
  rules: [{when: [{key: "request.auth.claims[groups]", values: [admin]}], to: [{operation: {methods: [DELETE]}}]}]
`)
	custom := policy(t, `
metadata: {name: ext, namespace: ambient-demo}
spec: {action: CUSTOM, provider: {name: ext-authz}, rules: [{to: [{operation: {paths: ["/ext"]}}]}]}
`)
	audit := policy(t, `
metadata: {name: audit, namespace: ambient-demo}
spec: {action: AUDIT, rules: [{}]}
`)
	plaintextDeny := policy(t, `
metadata: {name: require-mtls, namespace: ambient-demo}
spec: {action: DENY, rules: [{from: [{source: {notPrincipals: ["*"]}}]}]}
`)
	l7AllowTCP := policy(t, `
metadata: {name: l7-only, namespace: ambient-demo}
spec: {rules: [{from: [{source: {principals: [cluster.local/ns/ambient-demo/sa/sleep]}}], to: [{operation: {methods: [GET], ports: ["8000"]}}]}]}
`)
	l4Allow := policy(t, `
metadata: {name: l4-only, namespace: ambient-demo}
spec: {rules: [{from: [{source: {principals: [cluster.local/ns/ambient-demo/sa/sleep]}}]}]}
`)
	l7DenyTCP := policy(t, `
metadata: {name: l7-deny, namespace: ambient-demo}
spec: {action: DENY, rules: [{to: [{operation: {methods: [POST]}}]}]}
`)

	tests := []struct {
		name     string
		policies []*Policy
		req      *Request
		allowed  bool
		by       string
	}{
		{"seed: GET from sleep", []*Policy{seed}, httpReq(sleep, "GET", "/get"), true, "allow-sleep-to-httpbin"},
		{"seed: POST from sleep", []*Policy{seed}, httpReq(sleep, "POST", "/post"), false, ""},
		{"seed: GET from notsleep", []*Policy{seed}, httpReq(notsleep, "GET", "/get"), false, ""},
		{"seed: plaintext", []*Policy{seed}, httpReq(identity.Identity{}, "GET", "/get"), false, ""},
		{"no policies allow", nil, httpReq(other, "DELETE", "/"), true, ""},
		{"deny beats allow: prefix path", []*Policy{allowAll, denyAdmin}, httpReq(sleep, "GET", "/admin/x"), false, "deny-admin"},
		{"deny suffix path", []*Policy{allowAll, denyAdmin}, httpReq(sleep, "GET", "/a/secret"), false, "deny-admin"},
		{"deny exact path only", []*Policy{allowAll, denyAdmin}, httpReq(sleep, "GET", "/exact/no"), true, "allow-all"},
		{"deny header presence", []*Policy{allowAll, denyAdmin}, httpReq(sleep, "GET", "/", "X-Bad", "1"), false, "deny-admin"},
		{"allow with rules [{}]", []*Policy{allowAll}, httpReq(other, "GET", "/"), true, "allow-all"},
		{"allow with no rules allows nothing", []*Policy{allowNothing}, httpReq(sleep, "GET", "/"), false, ""},
		{"deny with no rules denies nothing", []*Policy{denyNoRules}, httpReq(sleep, "GET", "/"), true, ""},
		{"hosts ports when: match", []*Policy{hostsPorts}, httpReq(sleep, "GET", "/", "X-Env", "staging"), true, "hp"},
		{"when notValues", []*Policy{hostsPorts}, httpReq(sleep, "GET", "/", "X-Env", "staging-bad"), false, ""},
		{"when values miss", []*Policy{hostsPorts}, httpReq(sleep, "GET", "/", "X-Env", "dev"), false, ""},
		{"when header missing", []*Policy{hostsPorts}, httpReq(sleep, "GET", "/"), false, ""},
		{"notMethods", []*Policy{hostsPorts}, httpReq(sleep, "DELETE", "/", "X-Env", "prod"), false, ""},
		{"notPrincipals suffix", []*Policy{hostsPorts}, httpReq(notsleep, "GET", "/", "X-Env", "prod"), false, ""},
		{"namespaces", []*Policy{hostsPorts}, httpReq(other, "GET", "/", "X-Env", "prod"), false, ""},
		{"JWT required: never allowed", []*Policy{jwtAllow}, httpReq(sleep, "GET", "/"), false, ""},
		{"JWT deny fails closed", []*Policy{allowAll, jwtDeny}, httpReq(sleep, "GET", "/private/x"), false, "jwt-deny"},
		{"JWT deny other paths pass", []*Policy{allowAll, jwtDeny}, httpReq(sleep, "GET", "/public"), true, "allow-all"},
		{"unknown when key in DENY fails closed", []*Policy{unknownKey}, httpReq(sleep, "DELETE", "/"), false, "unknown"},
		{"unknown when key, other parts miss", []*Policy{unknownKey}, httpReq(sleep, "GET", "/"), true, ""},
		{"CUSTOM denies what it selects", []*Policy{allowAll, custom}, httpReq(sleep, "GET", "/ext"), false, "ext"},
		{"CUSTOM other paths", []*Policy{allowAll, custom}, httpReq(sleep, "GET", "/x"), true, "allow-all"},
		{"AUDIT does not decide", []*Policy{audit}, httpReq(sleep, "GET", "/"), true, ""},
		{"plaintext denied by notPrincipals *", []*Policy{plaintextDeny}, httpReq(identity.Identity{}, "GET", "/"), false, "require-mtls"},
		{"mTLS passes notPrincipals *", []*Policy{plaintextDeny}, httpReq(sleep, "GET", "/"), true, ""},
		{"TCP: L7 allow rule fails closed", []*Policy{l7AllowTCP}, tcpReq(sleep), false, ""},
		{"TCP: L4 allow rule works", []*Policy{l4Allow}, tcpReq(sleep), true, "l4-only"},
		{"TCP: L4 allow rule denies others", []*Policy{l4Allow}, tcpReq(notsleep), false, ""},
		{"TCP: L7 deny rule fails closed", []*Policy{l7DenyTCP}, tcpReq(sleep), false, "l7-deny"},
		{"HTTP: L7 deny rule on GET", []*Policy{l7DenyTCP}, httpReq(sleep, "GET", "/"), true, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := Evaluate(tc.policies, tc.req)
			if d.Allowed != tc.allowed {
				t.Fatalf("allowed=%v (%s %s), want %v", d.Allowed, d.Policy, d.Reason, tc.allowed)
			}
			if tc.by != "" && d.Policy != "ambient-demo/"+tc.by {
				t.Fatalf("decided by %q, want %q", d.Policy, tc.by)
			}
		})
	}
}

func TestDecodeFailsClosed(t *testing.T) {
	// A rule with a field we do not know must not grant, and must deny in a
	// DENY policy.
	allow := policy(t, `
metadata: {name: typo, namespace: ns}
spec: {rules: [{from: [{source: {principal: [x]}}]}]}
`)
	if d := Evaluate([]*Policy{allow}, httpReq(sleep, "GET", "/")); d.Allowed {
		t.Error("ALLOW rule with unknown field granted access")
	}
	deny := policy(t, `
metadata: {name: typo, namespace: ns}
spec: {action: DENY, rules: [{to: [{operation: {method: [GET]}}]}]}
`)
	if d := Evaluate([]*Policy{deny}, httpReq(sleep, "POST", "/")); d.Allowed {
		t.Error("DENY rule with unknown field did not deny")
	}
	future := policy(t, `
metadata: {name: future, namespace: ns}
spec: {action: DENY, futureField: true, rules: [{to: [{operation: {paths: [/x]}}]}]}
`)
	if len(future.Unknown) != 1 || Evaluate([]*Policy{future}, httpReq(sleep, "GET", "/y")).Allowed {
		t.Error("unknown top-level field must make a DENY policy deny")
	}
	for _, bad := range []string{`{`, `{"kind":"Sidecar"}`, `{"kind":"AuthorizationPolicy","spec":{"action":"MAYBE"}}`, `{"spec":[]}`} {
		if _, err := Decode([]byte(bad)); err == nil {
			t.Errorf("Decode(%s) succeeded", bad)
		}
	}
}

func TestApplies(t *testing.T) {
	tgt := Target{
		Namespace: "ambient-demo", ServiceName: "httpbin",
		WaypointName: "waypoint", WaypointNamespace: "ambient-demo",
		SelectedBy: map[string]bool{"ambient-demo/allow-sleep-to-httpbin": true}, RootNamespace: "istio-system",
	}
	tests := []struct {
		y    string
		want bool
	}{
		{seedPolicy, true},
		{`{metadata: {name: other, namespace: ambient-demo}, spec: {selector: {matchLabels: {app: x}}}}`, false},
		{`{metadata: {name: ns-wide, namespace: ambient-demo}, spec: {}}`, true},
		{`{metadata: {name: root, namespace: istio-system}, spec: {}}`, true},
		{`{metadata: {name: elsewhere, namespace: other}, spec: {}}`, false},
		{`{metadata: {name: gw, namespace: ambient-demo}, spec: {targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]}}`, true},
		{`{metadata: {name: gw2, namespace: ambient-demo}, spec: {targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: other-waypoint}}}`, false},
		{`{metadata: {name: svc, namespace: ambient-demo}, spec: {targetRefs: [{kind: Service, name: httpbin}]}}`, true},
		{`{metadata: {name: svc2, namespace: ambient-demo}, spec: {targetRefs: [{kind: Service, name: echo}]}}`, false},
		{`{metadata: {name: cls, namespace: istio-system}, spec: {targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}]}}`, true},
		// A Service is not a ServiceEntry of the same name.
		{`{metadata: {name: se, namespace: ambient-demo}, spec: {targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: httpbin}]}}`, false},
	}
	for _, tc := range tests {
		p := policy(t, tc.y)
		if got := Applies(p, tgt); got != tc.want {
			t.Errorf("%s: Applies=%v want %v", p.key(), got, tc.want)
		}
	}
	// Addressed to a ServiceEntry host: ServiceEntry-targeted policies
	// apply, Service-targeted ones of the same name do not.
	se := tgt
	se.ServiceName, se.ServiceEntry = "api", true
	if !Applies(policy(t, `{metadata: {name: se, namespace: ambient-demo}, spec: {targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: api}]}}`), se) {
		t.Error("ServiceEntry policy did not apply to its host")
	}
	for _, y := range []string{
		`{metadata: {name: svc, namespace: ambient-demo}, spec: {targetRefs: [{kind: Service, name: api}]}}`,
		`{metadata: {name: se, namespace: ambient-demo}, spec: {targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: other}]}}`,
		`{metadata: {name: se, namespace: other}, spec: {targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: api}]}}`,
	} {
		if p := policy(t, y); Applies(p, se) {
			t.Errorf("%s applied to ServiceEntry api", p.key())
		}
	}
	// Addressed to a pod: Service-targeted policies do not apply.
	pod := tgt
	pod.ServiceName = ""
	if Applies(policy(t, `{metadata: {name: svc, namespace: ambient-demo}, spec: {targetRefs: [{kind: Service, name: httpbin}]}}`), pod) {
		t.Error("service policy applied to pod-addressed request")
	}
}

func FuzzDecodeEvaluate(f *testing.F) {
	f.Add([]byte(`{"metadata":{"name":"a","namespace":"b"},"spec":{"rules":[{"to":[{"operation":{"paths":["/x*"]}}]}]}}`), "GET", "/x")
	f.Add([]byte(`{"spec":{"action":"DENY","rules":[{"when":[{"key":"request.headers[a]","values":["*"]}]}]}}`), "POST", "/")
	f.Fuzz(func(t *testing.T, data []byte, method, path string) {
		p, err := Decode(data)
		if err != nil {
			return
		}
		d := Evaluate([]*Policy{p}, httpReq(sleep, method, path, "A", strings.Repeat("b", len(path)%7)))
		if p.Spec.Action == Allow && len(p.Spec.Rules) == 0 && d.Allowed {
			t.Fatal("ALLOW with no rules allowed a request")
		}
	})
}
