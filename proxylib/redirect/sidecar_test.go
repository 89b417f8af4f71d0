package redirect

import (
	"net/netip"
	"slices"
	"testing"
)

func TestParseExclusions(t *testing.T) {
	tests := []struct {
		name          string
		out, in, nets string
		want          Exclusions
		wantErr       bool
	}{
		{name: "empty"},
		{name: "lists with spaces", out: "3306, 6379", in: "8081,", nets: "10.96.0.0/12, 192.168.1.7,fd00::/8",
			want: Exclusions{OutboundPorts: []uint16{3306, 6379}, InboundPorts: []uint16{8081},
				OutboundDestinations: []netip.Prefix{netip.MustParsePrefix("10.96.0.0/12"), netip.MustParsePrefix("192.168.1.7/32"), netip.MustParsePrefix("fd00::/8")}}},
		{name: "prefix is masked", nets: "10.1.2.3/8", want: Exclusions{OutboundDestinations: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}}},
		{name: "port zero", out: "0", wantErr: true},
		{name: "port too large", in: "70000", wantErr: true},
		{name: "not a port", out: "mysql", wantErr: true},
		{name: "not a range", nets: "10.0.0.0/33", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseExclusions(tt.out, tt.in, tt.nets)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tt.wantErr)
			}
			if tt.wantErr {
				return
			}
			if !slices.Equal(got.OutboundPorts, tt.want.OutboundPorts) || !slices.Equal(got.InboundPorts, tt.want.InboundPorts) ||
				!slices.Equal(got.OutboundDestinations, tt.want.OutboundDestinations) {
				t.Fatalf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestSidecarConfig(t *testing.T) {
	cfg := SidecarConfig(SidecarUID, Exclusions{InboundPorts: []uint16{8081}, OutboundPorts: []uint16{3306}})
	if !slices.Equal(cfg.SkipOwnerUIDs, []uint32{SidecarUID}) {
		t.Errorf("owner skip = %v", cfg.SkipOwnerUIDs)
	}
	for _, p := range []uint16{15008, 15020, 15021, 8081} {
		if !slices.Contains(cfg.SkipInboundPorts, p) {
			t.Errorf("inbound port %d is captured", p)
		}
	}
	if !slices.Equal(cfg.SkipOutboundPorts, []uint16{3306}) || cfg.PreserveSource {
		t.Errorf("cfg = %+v", cfg)
	}
}
