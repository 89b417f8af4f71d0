package xdsapi_test

import (
	"testing"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	envoy "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/ambientmesh/ambient/proxylib/discovery/xdsapi"

	"github.com/google/go-cmp/cmp"
)

// Our messages are Envoy's on the wire: every field the proxies use
// survives a trip through Envoy's generated types, both ways.
func TestWireIdenticalToEnvoy(t *testing.T) {
	md, _ := structpb.NewStruct(map[string]any{"NODE_NAME": "node-1", "ROLE": "ztunnel"})
	body, _ := anypb.New(structpb.NewStringValue("workload"))

	req := &xdsapi.DeltaDiscoveryRequest{
		Node:                     &xdsapi.Node{Id: "ztunnel~10.0.0.1~zt-1.ambient-system~ambient-system.svc.cluster.local", Cluster: "Kubernetes", Metadata: md},
		TypeUrl:                  "type.googleapis.com/istio.workload.Address",
		ResourceNamesSubscribe:   []string{"*", "10.0.0.9"},
		ResourceNamesUnsubscribe: []string{"10.0.0.8"},
		InitialResourceVersions:  map[string]string{"a": "1"},
		ResponseNonce:            "nonce-1",
		ErrorDetail:              &xdsapi.Status{Code: 3, Message: "bad", Details: []*anypb.Any{body}},
	}
	wantReq := &envoy.DeltaDiscoveryRequest{
		Node:                     &core.Node{Id: req.Node.Id, Cluster: "Kubernetes", Metadata: md},
		TypeUrl:                  req.TypeUrl,
		ResourceNamesSubscribe:   req.ResourceNamesSubscribe,
		ResourceNamesUnsubscribe: req.ResourceNamesUnsubscribe,
		InitialResourceVersions:  req.InitialResourceVersions,
		ResponseNonce:            "nonce-1",
		ErrorDetail:              &status.Status{Code: 3, Message: "bad", Details: []*anypb.Any{body}},
	}
	roundTrip(t, req, &envoy.DeltaDiscoveryRequest{}, wantReq)

	resp := &envoy.DeltaDiscoveryResponse{
		SystemVersionInfo: "v7",
		TypeUrl:           "type.googleapis.com/istio.workload.Address",
		Nonce:             "nonce-2",
		RemovedResources:  []string{"gone"},
		Resources:         []*envoy.Resource{{Name: "w1", Version: "3", Aliases: []string{"alias"}, Resource: body}},
	}
	wantResp := &xdsapi.DeltaDiscoveryResponse{
		SystemVersionInfo: "v7",
		TypeUrl:           resp.TypeUrl,
		Nonce:             "nonce-2",
		RemovedResources:  []string{"gone"},
		Resources:         []*xdsapi.Resource{{Name: "w1", Version: "3", Aliases: []string{"alias"}, Resource: body}},
	}
	roundTrip(t, resp, &xdsapi.DeltaDiscoveryResponse{}, wantResp)
}

// roundTrip marshals from, unmarshals into into, and compares with want;
// nothing may land in unknown fields.
func roundTrip(t *testing.T, from, into, want proto.Message) {
	t.Helper()
	b, err := proto.Marshal(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := proto.Unmarshal(b, into); err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(want, into, protocmp.Transform()); d != "" {
		t.Errorf("%T -> %T differs (-want +got):\n%s", from, into, d)
	}
}
