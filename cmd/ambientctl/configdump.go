package main

import (
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"

	"github.com/ambientmesh/ambient/proxylib/admin/adminapi"
)

// The proxy's /config_dump document (proxylib/admin/adminapi).
type (
	ConfigDump  = adminapi.ConfigDump
	Workload    = adminapi.Workload
	Service     = adminapi.Service
	Policy      = adminapi.Policy
	Certificate = adminapi.Certificate
	DNS         = adminapi.DNS
)

// parseConfigDump decodes and sanity-checks a proxy's answer, so a wrong port
// or an HTML error page gives a clear message instead of an empty table.
func parseConfigDump(b []byte) (*ConfigDump, error) {
	var d ConfigDump
	if err := json.Unmarshal(b, &d); err != nil {
		snippet := strings.TrimSpace(string(b))
		if len(snippet) > 120 {
			snippet = snippet[:120] + "..."
		}
		return nil, fmt.Errorf("the admin endpoint did not return a config dump (%v): %q", err, snippet)
	}
	return &d, nil
}

func orNone(s string) string {
	if s == "" {
		return "None"
	}
	return s
}

// writeWorkloads prints the seeds' `proxy-config workloads` table.
func writeWorkloads(w io.Writer, ws []Workload) error {
	ws = append([]Workload(nil), ws...)
	sort.SliceStable(ws, func(i, j int) bool {
		if ws[i].Name != ws[j].Name {
			return ws[i].Name < ws[j].Name
		}
		return ws[i].Namespace < ws[j].Namespace
	})
	tw := tabwriter.NewWriter(w, 0, 0, 1, ' ', 0)
	fmt.Fprintln(tw, "NAME\tNAMESPACE\tIP\tNODE\tWAYPOINT\tPROTOCOL")
	for _, wl := range ws {
		ip := strings.Join(wl.Addresses, ",")
		if ip == "" {
			ip = orNone(wl.Hostname) // resolved by the proxy when used
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", wl.Name, wl.Namespace, ip, orNone(wl.Node), orNone(wl.Waypoint), orNone(wl.Protocol))
	}
	return tw.Flush()
}

// writeSecrets prints the seeds' `proxy-config secrets` table: certificates
// grouped by identity, each group in the proxy's order (leaf first).
func writeSecrets(w io.Writer, cs []Certificate) error {
	cs = append([]Certificate(nil), cs...)
	sort.SliceStable(cs, func(i, j int) bool { return cs[i].Identity < cs[j].Identity })
	tw := tabwriter.NewWriter(w, 0, 0, 5, ' ', 0)
	fmt.Fprintln(tw, "NAME\tTYPE\tSTATUS\tVALID CERT\tSERIAL NUMBER\tNOT AFTER\tNOT BEFORE")
	for _, c := range cs {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%t\t%s\t%s\t%s\n", c.Identity, orNone(c.Type), orNone(c.State), c.Valid, orNone(c.Serial), orNone(c.NotAfter), orNone(c.NotBefore))
	}
	return tw.Flush()
}

func writeServices(w io.Writer, ss []Service) error {
	ss = append([]Service(nil), ss...)
	sort.SliceStable(ss, func(i, j int) bool {
		if ss[i].Namespace != ss[j].Namespace {
			return ss[i].Namespace < ss[j].Namespace
		}
		return ss[i].Name < ss[j].Name
	})
	tw := tabwriter.NewWriter(w, 0, 0, 1, ' ', 0)
	fmt.Fprintln(tw, "NAMESPACE\tSERVICE NAME\tSERVICE VIP\tWAYPOINT\tENDPOINTS")
	for _, s := range ss {
		name := s.Name
		if s.Hostname != "" && !strings.HasPrefix(s.Hostname, s.Name+"."+s.Namespace+".svc.") {
			name = s.Hostname // a ServiceEntry host: one row per host
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\n", s.Namespace, name, orNone(strings.Join(s.Addresses, ",")), orNone(s.Waypoint), s.Endpoints)
	}
	return tw.Flush()
}

// writeDNS prints the DNS proxy's settings and, per pod, whether its DNS
// is captured and where unanswered names go.
func writeDNS(w io.Writer, d *DNS) error {
	if d == nil {
		_, err := fmt.Fprintln(w, "no DNS proxy on this proxy")
		return err
	}
	def := orNone(strings.Join(d.DefaultUpstreams, ","))
	fmt.Fprintf(w, "DNS proxy :15053, cluster domain %s, default upstreams %s, cached answers %d\n", orNone(d.ClusterDomain), def, d.CacheEntries)
	tw := tabwriter.NewWriter(w, 0, 0, 1, ' ', 0)
	fmt.Fprintln(tw, "NAMESPACE\tPOD\tDNS CAPTURED\tUPSTREAMS")
	for _, p := range d.Pods {
		ups := "-"
		if p.Captured {
			ups = strings.Join(p.Nameservers, ",")
			if ups == "" {
				ups = def + " (default)"
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%t\t%s\n", p.Namespace, p.Name, p.Captured, ups)
	}
	return tw.Flush()
}

func writePolicies(w io.Writer, ps []Policy) error {
	tw := tabwriter.NewWriter(w, 0, 0, 1, ' ', 0)
	fmt.Fprintln(tw, "NAMESPACE\tPOLICY NAME\tACTION\tSCOPE")
	for _, p := range ps {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", p.Namespace, p.Name, p.Action, orNone(p.Scope))
	}
	return tw.Flush()
}

// renderProxyConfig prints one section (or all) as a table or JSON.
func renderProxyConfig(w io.Writer, d *ConfigDump, section, output string) error {
	if output == "json" {
		var v any
		switch section {
		case "workloads":
			v = nonNil(d.Workloads)
		case "secrets":
			v = nonNil(d.Certificates)
		case "services":
			v = nonNil(d.Services)
		case "policies":
			v = nonNil(d.Policies)
		case "dns":
			v = d.DNS
		default:
			v = d
		}
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	}
	switch section {
	case "workloads":
		return writeWorkloads(w, d.Workloads)
	case "secrets":
		return writeSecrets(w, d.Certificates)
	case "services":
		return writeServices(w, d.Services)
	case "policies":
		return writePolicies(w, d.Policies)
	case "dns":
		return writeDNS(w, d.DNS)
	}
	for i, f := range []func() error{
		func() error { return writeWorkloads(w, d.Workloads) },
		func() error { return writeServices(w, d.Services) },
		func() error { return writePolicies(w, d.Policies) },
		func() error { return writeSecrets(w, d.Certificates) },
		func() error {
			if d.DNS == nil {
				return nil
			}
			return writeDNS(w, d.DNS)
		},
	} {
		if i > 0 {
			fmt.Fprintln(w)
		}
		if err := f(); err != nil {
			return err
		}
	}
	return nil
}

func nonNil[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}
