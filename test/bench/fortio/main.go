// Command fortio is the lab's load generator and echo server for
// `make bench-mesh`, built on fortio.org/fortio's libraries — the tool
// Istio publishes its ambient numbers with. Fortio's own CLI is not built:
// one of its dependencies (grol.io/grol) is not served by the module proxy
// this project builds from. Its own module keeps fortio out of the
// product's dependencies.
//
//	fortio server [-port 8080]                    echo server (POST body echoed)
//	fortio load -qps N -c C -t D -payload-size B [-keepalive=false] [-timeout T] URL   JSON results on stdout
//	fortio hold -n N -t D host:port               hold N idle TCP connections
//	fortio plot -in results.json -out latency.png  latency distributions (host side)
//	fortio series -in results.json -out soak.png   a soak's RSS, goroutines and p99 over time (host side)
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"fortio.org/fortio/fhttp"
	"fortio.org/fortio/periodic"
	"fortio.org/log"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: fortio server|load|hold ...")
		os.Exit(2)
	}
	log.SetLogLevel(log.Warning) // results on stdout, nothing chatty beside them
	var err error
	switch os.Args[1] {
	case "server":
		err = server(os.Args[2:])
	case "load":
		err = load(os.Args[2:])
	case "hold":
		err = hold(os.Args[2:])
	case "plot":
		err = plot(os.Args[2:])
	case "series":
		err = series(os.Args[2:])
	default:
		err = fmt.Errorf("unknown mode %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "fortio:", err)
		os.Exit(1)
	}
}

func server(args []string) error {
	fs := flag.NewFlagSet("server", flag.ExitOnError)
	port := fs.String("port", "8080", "listen port")
	fs.Parse(args)
	if _, addr := fhttp.Serve(*port, ""); addr == nil {
		return fmt.Errorf("cannot listen on %s", *port)
	}
	select {}
}

func load(args []string) error {
	fs := flag.NewFlagSet("load", flag.ExitOnError)
	qps := fs.Float64("qps", 1000, "requests per second (all connections)")
	conns := fs.Int("c", 16, "connections")
	dur := fs.Duration("t", 15*time.Second, "duration")
	size := fs.Int("payload-size", 1024, "POST body size (echoed back); 0 sends GETs")
	keepalive := fs.Bool("keepalive", true, "reuse connections; false opens a new connection per request (the chaos tests)")
	timeout := fs.Duration("timeout", 0, "per-request timeout (0: fortio's default)")
	fs.Parse(args)
	if fs.NArg() != 1 {
		return fmt.Errorf("load: one URL")
	}
	o := fhttp.HTTPRunnerOptions{RunnerOptions: periodic.RunnerOptions{QPS: *qps, NumThreads: *conns, Duration: *dur,
		Percentiles: []float64{50, 90, 99, 99.9}, Out: os.Stderr}}
	o.URL = fs.Arg(0)
	if *size > 0 {
		o.Payload = []byte(strings.Repeat("x", *size))
	}
	o.DisableKeepAlive = !*keepalive
	o.HTTPReqTimeOut = *timeout
	res, err := fhttp.RunHTTPTest(&o)
	if err != nil {
		return err
	}
	res.Payload = nil // the request body, echoed into the results otherwise
	return json.NewEncoder(os.Stdout).Encode(res)
}

func hold(args []string) error {
	fs := flag.NewFlagSet("hold", flag.ExitOnError)
	n := fs.Int("n", 1000, "connections")
	dur := fs.Duration("t", time.Minute, "how long to hold them")
	fs.Parse(args)
	if fs.NArg() != 1 {
		return fmt.Errorf("hold: one host:port")
	}
	var held []net.Conn
	for range *n {
		c, err := net.DialTimeout("tcp", fs.Arg(0), 5*time.Second)
		if err != nil {
			return fmt.Errorf("after %d connections: %w", len(held), err)
		}
		held = append(held, c)
	}
	fmt.Printf("holding %d connections for %s\n", len(held), *dur)
	time.Sleep(*dur)
	for _, c := range held {
		c.Close()
	}
	return nil
}
