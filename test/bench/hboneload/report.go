package hboneload

import (
	"fmt"
	"strings"
	"time"
)

// hopsPerPath is the number of proxies a tunnelled connection crosses
// (client-side and server-side proxy); added latency is divided by it.
const hopsPerPath = 2

var modeNames = map[string]string{
	"raw": "raw TCP",
	"tls": "TLS 1.3 relay",
	"h2":  "HBONE HTTP/2",
	"h3":  "HBONE HTTP/3",
}

func modeName(m string) string {
	if n, ok := modeNames[m]; ok {
		return n
	}
	return m
}

func (r *Report) mode(name string) *ModeResult {
	for _, m := range r.Modes {
		if m.Mode == name {
			return m
		}
	}
	return nil
}

// Markdown renders raw numbers, ratios and goals.
func (r *Report) Markdown() string {
	var b strings.Builder
	c := r.Config
	copyLoop := c.Copy
	if copyLoop == "" {
		copyLoop = "shared"
	}
	fmt.Fprintf(&b, "Proxies' copy loop: %s", copyLoop)
	if c.FrameFit {
		b.WriteString(", tunnel writes split to 16375 bytes")
	}
	b.WriteString(". ")
	fmt.Fprintf(&b, "Run %s, %s; throughput over %s per run (median of %d); %d ping-pongs; %d pooled opens; %d handshakes; load average before %s, after %s.\n\n",
		r.Started.UTC().Format(time.RFC3339), r.Duration.Round(time.Second), bytesHuman(c.Bytes), c.Repeat,
		c.PingPongs, c.Opens, c.Handshakes, r.LoadBefore, r.LoadAfter)

	b.WriteString("| mode |")
	for _, n := range c.Streams {
		fmt.Fprintf(&b, " %d-stream Gbit/s |", n)
	}
	b.WriteString(" 1 KiB RTT p50 µs | p99 µs | added per hop p50 µs | p99 µs |")
	for _, n := range c.Tunnels {
		fmt.Fprintf(&b, " KiB/idle tunnel @%s (client+server proxy) |", count(n))
	}
	b.WriteString(" pooled opens/s | new mTLS conns/s |\n|---|")
	for range len(c.Streams) + 4 + len(c.Tunnels) + 2 {
		b.WriteString("---|")
	}
	b.WriteString("\n")
	raw := r.mode("raw")
	for _, m := range r.Modes {
		fmt.Fprintf(&b, "| %s |", modeName(m.Mode))
		for _, n := range c.Streams {
			fmt.Fprintf(&b, " %s |", num(m.Throughput[n]*8/1e9, 2))
		}
		fmt.Fprintf(&b, " %s | %s |", num(m.P50, 1), num(m.P99, 1))
		if raw != nil && m.Mode != "raw" && m.P50 > 0 && raw.P50 > 0 {
			fmt.Fprintf(&b, " %s | %s |", num((m.P50-raw.P50)/hopsPerPath, 1), num((m.P99-raw.P99)/hopsPerPath, 1))
		} else {
			b.WriteString(" – | – |")
		}
		for _, n := range c.Tunnels {
			if m.MemClient[n] == 0 && m.MemServer[n] == 0 {
				b.WriteString(" – |")
				continue
			}
			fmt.Fprintf(&b, " %s + %s |", num(m.MemClient[n]/1024, 1), num(m.MemServer[n]/1024, 1))
		}
		fmt.Fprintf(&b, " %s | %s |\n", num(m.Opens, 0), num(m.Handshakes, 0))
	}
	if hs := handshakeNotes(r); hs != "" {
		b.WriteString("\nNew mTLS connections: " + hs + ".\n")
	}

	b.WriteString("\n**Ratios (same run)**\n\n| ratio |")
	for _, n := range c.Streams {
		fmt.Fprintf(&b, " %d stream |", n)
	}
	b.WriteString("\n|---|")
	for range c.Streams {
		b.WriteString("---|")
	}
	b.WriteString("\n")
	for _, pair := range [][2]string{{"h2", "raw"}, {"h2", "tls"}, {"h3", "h2"}, {"h3", "raw"}, {"h3", "tls"}, {"tls", "raw"}} {
		a, d := r.mode(pair[0]), r.mode(pair[1])
		if a == nil || d == nil {
			continue
		}
		fmt.Fprintf(&b, "| %s / %s |", modeName(pair[0]), modeName(pair[1]))
		for _, n := range c.Streams {
			fmt.Fprintf(&b, " %s |", ratio(a.Throughput[n], d.Throughput[n]))
		}
		b.WriteString("\n")
	}

	b.WriteString("\n**Goals (issue #3)**\n\n| goal | measured | status |\n|---|---|---|\n")
	for _, g := range r.goals() {
		fmt.Fprintf(&b, "| %s | %s | %s |\n", g.name, g.measured, g.status)
	}
	for _, m := range r.Modes {
		for _, n := range m.Notes {
			fmt.Fprintf(&b, "\nNote (%s): %s\n", modeName(m.Mode), n)
		}
		for _, e := range m.Errors {
			fmt.Fprintf(&b, "\nError (%s): %s\n", modeName(m.Mode), e)
		}
	}
	return b.String()
}

type goal struct{ name, measured, status string }

func (r *Report) goals() []goal {
	h2, h3, raw, tlsr := r.mode("h2"), r.mode("h3"), r.mode("raw"), r.mode("tls")
	var gs []goal
	ratioGoal := func(name string, a, d *ModeResult, min float64) {
		if a == nil || d == nil || a.Throughput[1] == 0 || d.Throughput[1] == 0 {
			gs = append(gs, goal{name, "not measured", "not measured"})
			return
		}
		v := a.Throughput[1] / d.Throughput[1]
		gs = append(gs, goal{name, fmt.Sprintf("%.2f", v), metIf(v >= min)})
	}
	ratioGoal("HTTP/2 single stream ≥ 0.40 × raw TCP", h2, raw, 0.40)
	ratioGoal("HTTP/2 single stream ≥ 0.9 × TLS relay", h2, tlsr, 0.9)
	for _, m := range []*ModeResult{h2, h3} {
		if m == nil {
			continue
		}
		for _, n := range r.Config.Tunnels {
			worst := max(m.MemClient[n], m.MemServer[n])
			name := fmt.Sprintf("%s ≤ 32 KiB per idle tunnel per proxy @%s", modeName(m.Mode), count(n))
			if worst == 0 {
				gs = append(gs, goal{name, "not measured", "not measured"})
				continue
			}
			gs = append(gs, goal{name, fmt.Sprintf("client %.1f, server %.1f KiB", m.MemClient[n]/1024, m.MemServer[n]/1024), metIf(worst <= 32*1024)})
		}
	}
	for _, m := range []*ModeResult{h2, h3} {
		if m == nil || raw == nil || m.P50 == 0 || raw.P50 == 0 {
			continue
		}
		p50, p99 := (m.P50-raw.P50)/hopsPerPath, (m.P99-raw.P99)/hopsPerPath
		gs = append(gs, goal{modeName(m.Mode) + " ≤ +25 µs p50 per hop (1 KiB)", fmt.Sprintf("%+.1f µs", p50), metIf(p50 <= 25)})
		gs = append(gs, goal{modeName(m.Mode) + " ≤ +60 µs p99 per hop (1 KiB)", fmt.Sprintf("%+.1f µs", p99), metIf(p99 <= 60)})
	}
	for _, m := range []*ModeResult{h2, h3} {
		if m == nil {
			continue
		}
		name := modeName(m.Mode) + " ≥ 5k pooled tunnel opens/s"
		if m.Opens == 0 {
			gs = append(gs, goal{name, "not measured", "not measured"})
			continue
		}
		gs = append(gs, goal{name, fmt.Sprintf("%.0f/s", m.Opens), metIf(m.Opens >= 5000)})
	}
	ratioGoal("HTTP/3 ≥ 0.5 × HTTP/2 (single stream)", h3, h2, 0.5)
	return gs
}

func handshakeNotes(r *Report) string {
	var parts []string
	for _, m := range r.Modes {
		if m.handshakeOn != "" {
			parts = append(parts, modeName(m.Mode)+": "+m.handshakeOn)
		}
	}
	return strings.Join(parts, "; ")
}

func metIf(ok bool) string {
	if ok {
		return "met"
	}
	return "**not met**"
}

func num(v float64, prec int) string {
	if v == 0 {
		return "–"
	}
	return fmt.Sprintf("%.*f", prec, v)
}

func ratio(a, d float64) string {
	if a == 0 || d == 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f", a/d)
}

func count(n int) string {
	if n%1000 == 0 {
		return fmt.Sprintf("%dk", n/1000)
	}
	return fmt.Sprint(n)
}

func bytesHuman(n int64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%d GiB", n>>30)
	case n >= 1<<20:
		return fmt.Sprintf("%d MiB", n>>20)
	}
	return fmt.Sprintf("%d B", n)
}
