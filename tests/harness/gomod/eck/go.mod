// Wrapper module: pins github.com/elastic/cloud-on-k8s/v3 for the test harness. Nothing is built from it: the
// harness reads ECK's CRDs (config/crds/v1/resources) from the module source, which go.sum pins by hash.
// Do not run `go mod tidy` here: with no imports it would drop the requirement.
module borgdqn.test/harness/eck

go 1.26.0

require github.com/elastic/cloud-on-k8s/v3 v3.5.0
