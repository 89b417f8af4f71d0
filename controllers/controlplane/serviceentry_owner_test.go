package controlplane

import (
	"context"
	"net/netip"
	"testing"
	"time"

	apinetworking "istio.io/api/networking/v1alpha3"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	admissionv1 "k8s.io/api/admissionregistration/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	xds "github.com/ambientmesh/ambient/proxylib/discovery"
)

// TestCopiedServiceEntryVIPIsNotPublished: a tenant who may write
// serviceentries/status copies another namespace's entry's VIP into its
// own entry's status. Discovery must not publish the copy for the newer
// entry, not even for the moment until the allocator moves it off: here
// the allocator's writes to that entry are held back (a
// ValidatingAdmissionPolicy admits status writes to it from the tenant
// only), so the copy stays in status as long as the test needs. Once the
// older entry is deleted, the address is the newer entry's by the
// allocator's rules, and discovery publishes it for that entry (its
// namespace is recomputed when the other namespace's entry changes).
func TestCopiedServiceEntryVIPIsNotPublished(t *testing.T) {
	ctx := context.Background()
	zt := ztunnel(t, "zt-se-owner", "node-a", "10.200.0.9")
	state := startClient(t, token(t, zt, xds.TokenAudience), zt.Name, xds.RoleZtunnel)
	ensureNamespace(t, "se-owner", map[string]string{ambientLabel: "ambient"})
	ensureNamespace(t, "se-copier", map[string]string{ambientLabel: "ambient"})

	mk := func(ns, name, host string) *networkingv1.ServiceEntry {
		se := &networkingv1.ServiceEntry{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns}}
		se.Spec.Hosts, se.Spec.Resolution = []string{host}, apinetworking.ServiceEntry_DNS
		se.Spec.Ports = []*apinetworking.ServicePort{{Number: 80, Name: "http", Protocol: "HTTP"}}
		if err := s.k8s.Create(ctx, se); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = s.k8s.Delete(context.Background(), se) })
		return se
	}
	// vips: the entry's published service's addresses, or nil when the
	// service is not published.
	vips := func(ns, host string) map[string]bool {
		svc := state.ServiceByKey(xds.ServiceKey(ns, host))
		if svc == nil {
			return nil
		}
		return vipStrings(svc)
	}
	allocated := func(se *networkingv1.ServiceEntry) (v4, v6 string) {
		t.Helper()
		eventually(t, se.Name+" allocated and published", func() bool {
			if err := s.k8s.Get(ctx, client.ObjectKeyFromObject(se), se); err != nil {
				t.Fatal(err)
			}
			for _, a := range se.Status.GetAddresses() {
				if netip.MustParseAddr(a.Value).Is4() {
					v4 = a.Value
				} else {
					v6 = a.Value
				}
			}
			got := vips(se.Namespace, se.Spec.Hosts[0])
			return v4 != "" && v6 != "" && got[v4] && got[v6]
		})
		return v4, v6
	}

	owner := mk("se-owner", "owner", "owner.example.com")
	ownerVIP, _ := allocated(owner)
	time.Sleep(1100 * time.Millisecond) // creation timestamps have second precision: copier is newer
	copier := mk("se-copier", "copier", "copier.example.com")
	_, copierVIP6 := allocated(copier)

	// Hold the allocator off the copier: status writes to it are admitted
	// from the tenant only.
	tenant, err := s.env.AddUser(envtest.User{Name: "se-tenant", Groups: []string{"system:masters"}}, s.cfg)
	if err != nil {
		t.Fatal(err)
	}
	tc, err := client.New(tenant.Config(), client.Options{Scheme: testScheme()})
	if err != nil {
		t.Fatal(err)
	}
	fail := admissionv1.Fail
	policy := &admissionv1.ValidatingAdmissionPolicy{ObjectMeta: metav1.ObjectMeta{Name: "hold-se-copier-status"},
		Spec: admissionv1.ValidatingAdmissionPolicySpec{
			FailurePolicy: &fail,
			MatchConstraints: &admissionv1.MatchResources{ResourceRules: []admissionv1.NamedRuleWithOperations{{
				RuleWithOperations: admissionv1.RuleWithOperations{Operations: []admissionv1.OperationType{admissionv1.Update},
					Rule: admissionv1.Rule{APIGroups: []string{"networking.istio.io"}, APIVersions: []string{"*"}, Resources: []string{"serviceentries/status"}}},
			}}},
			MatchConditions: []admissionv1.MatchCondition{{Name: "copier", Expression: "object.metadata.namespace == 'se-copier'"}},
			Validations:     []admissionv1.Validation{{Expression: "request.userInfo.username == 'se-tenant'", Message: "held for the test"}},
		}}
	binding := &admissionv1.ValidatingAdmissionPolicyBinding{ObjectMeta: metav1.ObjectMeta{Name: "hold-se-copier-status"},
		Spec: admissionv1.ValidatingAdmissionPolicyBindingSpec{PolicyName: policy.Name, ValidationActions: []admissionv1.ValidationAction{admissionv1.Deny}}}
	for _, o := range []client.Object{policy, binding} {
		if err := s.k8s.Create(ctx, o); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = s.k8s.Delete(context.Background(), o) })
	}
	eventually(t, "the copier's status held (admin writes refused)", func() bool {
		cur := &networkingv1.ServiceEntry{}
		if err := s.k8s.Get(ctx, client.ObjectKeyFromObject(copier), cur); err != nil {
			t.Fatal(err)
		}
		cur.Status.Conditions = nil // a write the allocator would undo, were it admitted
		return s.k8s.Status().Update(ctx, cur) != nil
	})

	// The tenant copies the owner's VIP, replacing the copier's own.
	if err := tc.Get(ctx, client.ObjectKeyFromObject(copier), copier); err != nil {
		t.Fatal(err)
	}
	copier.Status.Addresses = []*apinetworking.ServiceEntryAddress{{Host: "copier.example.com", Value: ownerVIP}}
	if err := tc.Status().Update(ctx, copier); err != nil {
		t.Fatal(err)
	}
	// The push carrying the tenant's write: the copier's own IPv6 VIP is
	// gone from its service.
	eventually(t, "the copier's service without its former IPv6 VIP", func() bool {
		got := vips("se-copier", "copier.example.com")
		return got != nil && !got[copierVIP6]
	})
	if got := vips("se-copier", "copier.example.com"); got[ownerVIP] {
		t.Fatalf("the copier's service is published with the owner's VIP %s (copied into its status): %v", ownerVIP, got)
	}
	if svc := state.ServiceByVIP(netip.MustParseAddr(ownerVIP)); svc == nil || svc.Hostname != "owner.example.com" {
		t.Fatalf("VIP %s resolves to %v, want owner.example.com", ownerVIP, svc)
	}
	var cur networkingv1.ServiceEntry
	if err := s.k8s.Get(ctx, client.ObjectKeyFromObject(copier), &cur); err != nil || len(cur.Status.Addresses) != 1 || cur.Status.Addresses[0].Value != ownerVIP {
		t.Fatalf("the copy did not stay in status while the test needed it (%v): %v", err, cur.Status.Addresses)
	}

	// The owner goes: the address is now the copier's (the allocator
	// keeps it), and discovery publishes it for the copier.
	if err := s.k8s.Delete(ctx, owner); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the copier published with the address the owner released", func() bool {
		return vips("se-copier", "copier.example.com")[ownerVIP]
	})
}
