package xdsapi

import (
	"context"

	"github.com/ambientmesh/ambient/proxylib/grpcwire"
)

// DeltaAggregatedResourcesMethod is Envoy's delta ADS method: the control
// plane (and istiod) serve it with Envoy's message types, which are
// wire-identical to this package's.
const DeltaAggregatedResourcesMethod = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"

// DeltaStream is one delta ADS stream.
type DeltaStream struct{ s *grpcwire.Stream }

// OpenDeltaStream starts a delta ADS stream on conn; Close releases it.
func OpenDeltaStream(ctx context.Context, conn *grpcwire.Conn) (*DeltaStream, error) {
	s, err := conn.NewStream(ctx, DeltaAggregatedResourcesMethod)
	if err != nil {
		return nil, err
	}
	return &DeltaStream{s}, nil
}

// Send sends a request.
func (s *DeltaStream) Send(r *DeltaDiscoveryRequest) error { return s.s.Send(r) }

// Recv waits for the next response.
func (s *DeltaStream) Recv() (*DeltaDiscoveryResponse, error) {
	r := new(DeltaDiscoveryResponse)
	if err := s.s.Recv(r); err != nil {
		return nil, err
	}
	return r, nil
}

// Close ends the stream.
func (s *DeltaStream) Close() { s.s.Close() }
