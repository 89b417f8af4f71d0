// Package e2e is the end-to-end suite of the lab (build tag e2e): the seeds'
// journey and the mesh's lifecycle scenarios against a real multi-node
// cluster. Run it with test/lab/e2e.sh (make e2e); plain `go test ./...`
// compiles nothing here.
package e2e
