// Command hbone-load is the HBONE benchmark tool: its subcommands are the
// roles of a benchmark (sink server, proxies, clients), each run as its own
// process, and "bench" runs the whole matrix. See docs/performance.md.
package main

import (
	"os"

	"github.com/ambientmesh/ambient/test/bench/hboneload"
)

func main() {
	os.Exit(hboneload.Main(os.Args[1:], os.Stdout, os.Stderr))
}
