package authz

import (
	"encoding/json"
	"testing"

	apisecurity "istio.io/api/security/v1beta1"
	apitype "istio.io/api/type/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// The control plane sends AuthorizationPolicies as the JSON of Istio's Go
// types (controllers/discovery addL7). Decode must read that encoding:
// camelCase fields, enum names, ALLOW omitted as the zero value.
func TestDecodeIstioClientGoJSON(t *testing.T) {
	ap := &securityv1.AuthorizationPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "allow-sleep-to-httpbin", Namespace: "ambient-demo"},
		Spec: apisecurity.AuthorizationPolicy{
			Selector: &apitype.WorkloadSelector{MatchLabels: map[string]string{"app": "httpbin"}},
			Rules: []*apisecurity.Rule{{
				From: []*apisecurity.Rule_From{{Source: &apisecurity.Source{Principals: []string{"cluster.local/ns/ambient-demo/sa/sleep"}, NotIpBlocks: []string{"10.9.0.0/16"}}}},
				To:   []*apisecurity.Rule_To{{Operation: &apisecurity.Operation{Methods: []string{"GET"}, NotPaths: []string{"/admin*"}}}},
				When: []*apisecurity.Condition{{Key: "request.headers[x-env]", NotValues: []string{"dev"}}},
			}},
		},
	}
	raw, err := json.Marshal(ap)
	if err != nil {
		t.Fatal(err)
	}
	var full map[string]any
	json.Unmarshal(raw, &full)
	body, _ := json.Marshal(map[string]any{
		"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
		"metadata": map[string]any{"name": ap.Name, "namespace": ap.Namespace}, "spec": full["spec"],
	})
	p, err := Decode(body)
	if err != nil {
		t.Fatalf("%v\n%s", err, body)
	}
	if p.Spec.Action != Allow || len(p.Spec.Rules) != 1 || p.Spec.Rules[0].unsupported != "" || len(p.Unknown) != 0 {
		t.Fatalf("decoded %+v (rule %+v) from %s", p.Spec, p.Spec.Rules[0], body)
	}
	ok := Evaluate([]*Policy{p}, httpReq(sleep, "GET", "/get", "X-Env", "prod"))
	bad := Evaluate([]*Policy{p}, httpReq(sleep, "GET", "/admin/x", "X-Env", "prod"))
	post := Evaluate([]*Policy{p}, httpReq(sleep, "POST", "/get", "X-Env", "prod"))
	if !ok.Allowed || bad.Allowed || post.Allowed {
		t.Fatalf("GET %v, GET /admin %v, POST %v", ok, bad, post)
	}
	deny := ap.DeepCopy()
	deny.Spec.Action = apisecurity.AuthorizationPolicy_DENY
	raw, _ = json.Marshal(deny)
	json.Unmarshal(raw, &full)
	body, _ = json.Marshal(map[string]any{"metadata": map[string]any{"name": "d", "namespace": "n"}, "spec": full["spec"]})
	if p, err := Decode(body); err != nil || p.Spec.Action != Deny {
		t.Fatalf("DENY decoded as %v (%v) from %s", p, err, body)
	}
}
