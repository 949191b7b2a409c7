// Wrapper module: pins github.com/prometheus-operator/prometheus-operator for the test harness. Nothing is built
// from it: the harness reads the ServiceMonitor CRD (example/prometheus-operator-crd) from the module source,
// which go.sum pins by hash. Do not run `go mod tidy` here: with no imports it would drop the requirement.
module borgdqn.test/harness/prometheus

go 1.26.0

require github.com/prometheus-operator/prometheus-operator v0.85.0
