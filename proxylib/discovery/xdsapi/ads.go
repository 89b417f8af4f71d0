package xdsapi

import (
	"context"

	"google.golang.org/grpc"
)

// DeltaAggregatedResourcesMethod is Envoy's delta ADS method: the control
// plane (and istiod) serve it with Envoy's message types, which are
// wire-identical to this package's.
const DeltaAggregatedResourcesMethod = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"

var deltaADS = grpc.StreamDesc{StreamName: "DeltaAggregatedResources", ServerStreams: true, ClientStreams: true}

// DeltaStream is one delta ADS stream.
type DeltaStream struct{ grpc.ClientStream }

// OpenDeltaStream starts a delta ADS stream on conn.
func OpenDeltaStream(ctx context.Context, conn grpc.ClientConnInterface, opts ...grpc.CallOption) (*DeltaStream, error) {
	s, err := conn.NewStream(ctx, &deltaADS, DeltaAggregatedResourcesMethod, opts...)
	if err != nil {
		return nil, err
	}
	return &DeltaStream{s}, nil
}

// Send sends a request.
func (s *DeltaStream) Send(r *DeltaDiscoveryRequest) error { return s.SendMsg(r) }

// Recv waits for the next response.
func (s *DeltaStream) Recv() (*DeltaDiscoveryResponse, error) {
	r := new(DeltaDiscoveryResponse)
	if err := s.RecvMsg(r); err != nil {
		return nil, err
	}
	return r, nil
}
