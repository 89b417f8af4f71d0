module github.com/ambientmesh/ambient/test/interop

go 1.26.0

replace github.com/ambientmesh/ambient => ../..

replace istio.io/api => istio.io/api v1.29.0-rc.1.0.20260209142455-7fea5efd57ca

require (
	github.com/ambientmesh/ambient v0.0.0-00010101000000-000000000000
	istio.io/istio v0.0.0-20250506181944-c2e9871f340c
)

require (
	github.com/cbeuw/connutil v0.0.0-20200411215123-966bfaa51ee3 // indirect
	github.com/go-jose/go-jose/v4 v4.1.4 // indirect
	github.com/go-logr/logr v1.4.4 // indirect
	github.com/golang/protobuf v1.5.4 // indirect
	github.com/inconshreveable/mousetrap v1.1.0 // indirect
	github.com/spf13/cobra v1.10.2 // indirect
	github.com/spf13/pflag v1.0.10 // indirect
	go.uber.org/multierr v1.11.0 // indirect
	go.uber.org/zap v1.28.0 // indirect
	golang.org/x/net v0.62.0 // indirect
	golang.org/x/text v0.43.0 // indirect
	google.golang.org/genproto/googleapis/api v0.0.0-20260817212433-ac3dfec99bb1 // indirect
	google.golang.org/grpc v1.85.0 // indirect
	google.golang.org/protobuf v1.36.12 // indirect
	gopkg.in/natefinch/lumberjack.v2 v2.2.1 // indirect
	istio.io/api v1.29.0-rc.1.0.20260209142455-7fea5efd57ca // indirect
	k8s.io/klog/v2 v2.140.0 // indirect
)
