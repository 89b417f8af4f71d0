// Package authz evaluates Istio AuthorizationPolicy objects with full L7
// semantics (from / to / when, DENY before ALLOW) for the waypoint. Policies
// arrive from the control plane as JSON (discovery L7Resource) and are decoded
// into the types below, which mirror security.istio.io/v1 field for field.
//
// JWT (requestPrincipals, notRequestPrincipals, request.auth.* conditions) is
// not implemented: a rule that needs it fails closed — it never matches in an
// ALLOW policy and always matches in a DENY policy. The same applies to any
// field or condition key we do not understand, and to CUSTOM policies (no
// external authorizer), which deny the requests they select.
package authz

import (
	"bytes"
	"encoding/json"
	"fmt"
)

// Action is the policy action.
type Action string

const (
	Allow  Action = "ALLOW"
	Deny   Action = "DENY"
	Audit  Action = "AUDIT"
	Custom Action = "CUSTOM"
)

// Policy is an AuthorizationPolicy (metadata plus spec).
type Policy struct {
	Namespace string
	Name      string
	Spec      Spec
	// Unknown lists spec fields we did not recognise; their presence makes
	// every rule fail closed.
	Unknown []string
}

// Spec mirrors istio.security.v1beta1.AuthorizationPolicy.
type Spec struct {
	Selector   *Selector   `json:"selector,omitempty"`
	TargetRef  *TargetRef  `json:"targetRef,omitempty"`
	TargetRefs []TargetRef `json:"targetRefs,omitempty"`
	Action     Action      `json:"action,omitempty"`
	Rules      []*Rule     `json:"rules,omitempty"`
	Provider   *struct {
		Name string `json:"name,omitempty"`
	} `json:"provider,omitempty"`
}

type Selector struct {
	MatchLabels map[string]string `json:"matchLabels,omitempty"`
}

// TargetRef is Istio's PolicyTargetReference.
type TargetRef struct {
	Group     string `json:"group,omitempty"`
	Kind      string `json:"kind,omitempty"`
	Name      string `json:"name,omitempty"`
	Namespace string `json:"namespace,omitempty"`
}

type Rule struct {
	From []*From      `json:"from,omitempty"`
	To   []*To        `json:"to,omitempty"`
	When []*Condition `json:"when,omitempty"`
	// unsupported says why this rule cannot be evaluated faithfully (a field
	// we do not know); such a rule fails closed.
	unsupported string
}

type From struct {
	Source *Source `json:"source,omitempty"`
}

type Source struct {
	Principals           []string `json:"principals,omitempty"`
	NotPrincipals        []string `json:"notPrincipals,omitempty"`
	RequestPrincipals    []string `json:"requestPrincipals,omitempty"`
	NotRequestPrincipals []string `json:"notRequestPrincipals,omitempty"`
	Namespaces           []string `json:"namespaces,omitempty"`
	NotNamespaces        []string `json:"notNamespaces,omitempty"`
	IPBlocks             []string `json:"ipBlocks,omitempty"`
	NotIPBlocks          []string `json:"notIpBlocks,omitempty"`
	RemoteIPBlocks       []string `json:"remoteIpBlocks,omitempty"`
	NotRemoteIPBlocks    []string `json:"notRemoteIpBlocks,omitempty"`
	ServiceAccounts      []string `json:"serviceAccounts,omitempty"`
	NotServiceAccounts   []string `json:"notServiceAccounts,omitempty"`
}

type To struct {
	Operation *Operation `json:"operation,omitempty"`
}

type Operation struct {
	Hosts      []string `json:"hosts,omitempty"`
	NotHosts   []string `json:"notHosts,omitempty"`
	Ports      []string `json:"ports,omitempty"`
	NotPorts   []string `json:"notPorts,omitempty"`
	Methods    []string `json:"methods,omitempty"`
	NotMethods []string `json:"notMethods,omitempty"`
	Paths      []string `json:"paths,omitempty"`
	NotPaths   []string `json:"notPaths,omitempty"`
}

type Condition struct {
	Key       string   `json:"key"`
	Values    []string `json:"values,omitempty"`
	NotValues []string `json:"notValues,omitempty"`
}

// object is the Kubernetes envelope of an AuthorizationPolicy.
type object struct {
	Kind     string `json:"kind"`
	Metadata struct {
		Name      string `json:"name"`
		Namespace string `json:"namespace"`
	} `json:"metadata"`
	Spec json.RawMessage `json:"spec"`
}

var knownSpecFields = map[string]bool{
	"selector": true, "targetRef": true, "targetRefs": true, "action": true, "rules": true, "provider": true,
}

// Decode parses an AuthorizationPolicy from its Kubernetes JSON. A rule with
// fields we do not know is kept but fails closed; unknown top-level spec
// fields are recorded in Unknown and make every rule fail closed. A policy
// that does not parse at all is an error: the caller must fail closed for its
// namespace (see Set.Broken).
func Decode(data []byte) (*Policy, error) {
	var obj object
	if err := json.Unmarshal(data, &obj); err != nil {
		return nil, fmt.Errorf("authorization policy: %w", err)
	}
	if obj.Kind != "" && obj.Kind != "AuthorizationPolicy" {
		return nil, fmt.Errorf("kind %q is not AuthorizationPolicy", obj.Kind)
	}
	p := &Policy{Namespace: obj.Metadata.Namespace, Name: obj.Metadata.Name}
	if len(obj.Spec) == 0 {
		p.Spec.Action = Allow
		return p, nil
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(obj.Spec, &fields); err != nil {
		return nil, fmt.Errorf("authorization policy %s/%s spec: %w", p.Namespace, p.Name, err)
	}
	for k := range fields {
		if !knownSpecFields[k] {
			p.Unknown = append(p.Unknown, k)
		}
	}
	if err := strictUnmarshal(obj.Spec, &p.Spec); err != nil {
		return nil, fmt.Errorf("authorization policy %s/%s spec: %w", p.Namespace, p.Name, err)
	}
	if p.Spec.Action == "" {
		p.Spec.Action = Allow
	}
	switch p.Spec.Action {
	case Allow, Deny, Audit, Custom:
	default:
		return nil, fmt.Errorf("authorization policy %s/%s: unknown action %q", p.Namespace, p.Name, p.Spec.Action)
	}
	return p, nil
}

// strictUnmarshal decodes the spec leniently at the top level and each rule
// strictly, marking rules with unknown fields as unsupported.
func strictUnmarshal(data []byte, spec *Spec) error {
	if err := json.Unmarshal(data, spec); err != nil {
		return err
	}
	var raw struct {
		Rules []json.RawMessage `json:"rules"`
	}
	if err := json.Unmarshal(data, &raw); err != nil {
		return err
	}
	for i, r := range raw.Rules {
		if i >= len(spec.Rules) || spec.Rules[i] == nil {
			continue
		}
		dec := json.NewDecoder(bytes.NewReader(r))
		dec.DisallowUnknownFields()
		var probe Rule
		if err := dec.Decode(&probe); err != nil {
			spec.Rules[i].unsupported = err.Error()
		}
	}
	return nil
}
