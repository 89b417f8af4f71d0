package main

import (
	"flag"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"github.com/miekg/dns"
)

// digMain is a small `dig +search`: it resolves one name as a stub
// resolver does (the pod's resolv.conf: first nameserver, search list,
// ndots), over UDP (TCP when the answer is truncated) or TCP, and prints
// what the last query asked got:
//
//	<queried name> <RCODE> <address,address...|->
//
// A name answered NXDOMAIN is tried with the next search suffix, as
// resolvers do; any other answer ends the search. The lab's DNS scenario
// reads the exact response code (NXDOMAIN, SERVFAIL) that a resolver
// library would only turn into an error. Exit 0 when a server answered,
// 1 when none did, 2 on usage errors.
func digMain(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("dig", flag.ContinueOnError)
	fs.SetOutput(stderr)
	useTCP := fs.Bool("tcp", false, "query over TCP")
	qtype := fs.String("type", "A", "query type (A or AAAA)")
	conf := fs.String("resolv-conf", "/etc/resolv.conf", "resolver configuration")
	timeout := fs.Duration("timeout", 5*time.Second, "per query")
	if err := fs.Parse(args); err != nil || fs.NArg() != 1 {
		fmt.Fprintln(stderr, "usage: dig [-tcp] [-type A|AAAA] [-resolv-conf FILE] NAME")
		return exitUsage
	}
	t, ok := map[string]uint16{"A": dns.TypeA, "AAAA": dns.TypeAAAA}[strings.ToUpper(*qtype)]
	if !ok {
		fmt.Fprintf(stderr, "dig: query type %q: A or AAAA\n", *qtype)
		return exitUsage
	}
	cc, err := dns.ClientConfigFromFile(*conf)
	if err != nil || len(cc.Servers) == 0 {
		fmt.Fprintf(stderr, "dig: %s: no nameserver (%v)\n", *conf, err)
		return 1
	}
	c := &dns.Client{Net: "udp", Timeout: *timeout}
	if *useTCP {
		c.Net = "tcp"
	}
	server := net.JoinHostPort(cc.Servers[0], cc.Port)
	line, err := digSearch(c, server, cc.NameList(fs.Arg(0)), t)
	if err != nil {
		fmt.Fprintf(stderr, "dig: %v\n", err)
		return 1
	}
	fmt.Fprintln(stdout, line)
	return 0
}

// digSearch asks server for each name in turn until one is not NXDOMAIN,
// and formats the last answer.
func digSearch(c *dns.Client, server string, names []string, qtype uint16) (string, error) {
	var line string
	for _, name := range names {
		q := new(dns.Msg)
		q.SetQuestion(name, qtype)
		r, _, err := c.Exchange(q, server)
		if err == nil && r.Truncated && c.Net == "udp" {
			// As stub resolvers do: a truncated answer is asked again over TCP.
			r, _, err = (&dns.Client{Net: "tcp", Timeout: c.Timeout}).Exchange(q, server)
		}
		if err != nil {
			return "", fmt.Errorf("%s %s to %s: %w", dns.TypeToString[qtype], name, server, err)
		}
		var addrs []string
		for _, rr := range r.Answer {
			switch a := rr.(type) {
			case *dns.A:
				addrs = append(addrs, a.A.String())
			case *dns.AAAA:
				addrs = append(addrs, a.AAAA.String())
			}
		}
		if len(addrs) == 0 {
			addrs = []string{"-"}
		}
		line = name + " " + dns.RcodeToString[r.Rcode] + " " + strings.Join(addrs, ",")
		if r.Rcode != dns.RcodeNameError {
			break
		}
	}
	return line, nil
}
