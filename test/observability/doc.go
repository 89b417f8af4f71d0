// Package observability checks what the repository ships for monitoring
// the mesh against the code: the Prometheus Operator component
// (config/prometheus) selects the pods and ports the operator really
// deploys, and every PromQL expression of the Grafana dashboards
// (config/grafana) parses and names a metric the binaries register.
//
// It is a module of its own so that Prometheus' PromQL parser (and the
// dependencies it brings) never enter the main module's build.
package observability
