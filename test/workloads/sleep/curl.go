package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// curl's documented exit codes for the failures the lab cares about.
const (
	exitOK            = 0
	exitUsage         = 2
	exitBadURL        = 3
	exitResolve       = 6
	exitConnect       = 7
	exitHTTPError     = 22
	exitWrite         = 23
	exitTimeout       = 28
	exitEmptyReply    = 52
	exitRecvError     = 56
	exitSendError     = 55
	exitUnknownFailed = 1
)

// curlOptions is the subset of curl's command line that the lab uses.
type curlOptions struct {
	URLs           []string
	Method         string
	Headers        []string
	Data           string
	HasData        bool
	Head           bool // -I
	Include        bool // -i
	Silent         bool // -s
	ShowError      bool // -S
	Verbose        bool // -v
	Fail           bool // -f
	Output         string
	WriteOut       string
	MaxTime        time.Duration
	ConnectTimeout time.Duration
	Repeat         int // non-curl: run the URL list this many times
}

// parseCurlArgs understands short flag clusters (-sI), long flags with a
// separate or "=" value, and bare URLs, as curl does.
func parseCurlArgs(args []string) (curlOptions, error) {
	o := curlOptions{Repeat: 1}
	valueFlags := map[string]bool{"-X": true, "-H": true, "-d": true, "-o": true, "-w": true, "-m": true,
		"--request": true, "--header": true, "--data": true, "--output": true, "--write-out": true,
		"--max-time": true, "--connect-timeout": true, "--repeat": true, "--data-raw": true}
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--":
			o.URLs = append(o.URLs, args[i+1:]...)
			i = len(args)
		case strings.HasPrefix(a, "--"):
			name, val, hasVal := strings.Cut(a, "=")
			if valueFlags[name] && !hasVal {
				if i+1 >= len(args) {
					return o, fmt.Errorf("option %s: requires parameter", name)
				}
				i++
				val = args[i]
			}
			if err := o.setLong(name, val); err != nil {
				return o, err
			}
		case strings.HasPrefix(a, "-") && len(a) > 1:
			for j := 1; j < len(a); j++ {
				flag := "-" + string(a[j])
				if !valueFlags[flag] {
					if err := o.setShort(flag); err != nil {
						return o, err
					}
					continue
				}
				val := a[j+1:]
				if val == "" {
					if i+1 >= len(args) {
						return o, fmt.Errorf("option %s: requires parameter", flag)
					}
					i++
					val = args[i]
				}
				if err := o.setValue(flag, val); err != nil {
					return o, err
				}
				break
			}
		default:
			o.URLs = append(o.URLs, a)
		}
	}
	if len(o.URLs) == 0 {
		return o, errors.New("no URL specified")
	}
	return o, nil
}

func (o *curlOptions) setShort(flag string) error {
	switch flag {
	case "-s":
		o.Silent = true
	case "-S":
		o.ShowError = true
	case "-I":
		o.Head = true
	case "-i":
		o.Include = true
	case "-v":
		o.Verbose = true
	case "-f":
		o.Fail = true
	case "-L", "-k":
		// Redirects are not followed and TLS is not used in the lab; accepted for compatibility.
	default:
		return fmt.Errorf("option %s: is unknown", flag)
	}
	return nil
}

func (o *curlOptions) setLong(name, val string) error {
	switch name {
	case "--silent":
		return o.setShort("-s")
	case "--show-error":
		return o.setShort("-S")
	case "--head":
		return o.setShort("-I")
	case "--include":
		return o.setShort("-i")
	case "--verbose":
		return o.setShort("-v")
	case "--fail":
		return o.setShort("-f")
	case "--request":
		return o.setValue("-X", val)
	case "--header":
		return o.setValue("-H", val)
	case "--data", "--data-raw":
		return o.setValue("-d", val)
	case "--output":
		return o.setValue("-o", val)
	case "--write-out":
		return o.setValue("-w", val)
	case "--max-time":
		return o.setValue("-m", val)
	case "--connect-timeout":
		d, err := parseSeconds(val)
		o.ConnectTimeout = d
		return err
	case "--repeat":
		n, err := strconv.Atoi(val)
		if err != nil || n < 1 || n > 100000 {
			return fmt.Errorf("option --repeat: expected a count between 1 and 100000")
		}
		o.Repeat = n
		return nil
	}
	return fmt.Errorf("option %s: is unknown", name)
}

func (o *curlOptions) setValue(flag, val string) error {
	switch flag {
	case "-X":
		o.Method = val
	case "-H":
		o.Headers = append(o.Headers, val)
	case "-d":
		o.Data, o.HasData = val, true
	case "-o":
		o.Output = val
	case "-w":
		o.WriteOut = val
	case "-m":
		d, err := parseSeconds(val)
		o.MaxTime = d
		return err
	}
	return nil
}

func parseSeconds(v string) (time.Duration, error) {
	f, err := strconv.ParseFloat(v, 64)
	if err != nil || f < 0 {
		return 0, fmt.Errorf("expected a number of seconds, got %q", v)
	}
	return time.Duration(f * float64(time.Second)), nil
}

// normalizeURL adds curl's default scheme and path.
func normalizeURL(raw string) (*url.URL, error) {
	if !strings.Contains(raw, "://") {
		raw = "http://" + raw
	}
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		return nil, fmt.Errorf("URL rejected: malformed input %q", raw)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, fmt.Errorf("protocol %q not supported", u.Scheme)
	}
	if u.Path == "" {
		u.Path = "/"
	}
	return u, nil
}

// exitCodeFor maps a Go client error to curl's exit code, so callers (and the
// seeds' "command terminated with exit code 56") see what curl would report.
func exitCodeFor(err error) int {
	var dnsErr *net.DNSError
	var netErr net.Error
	switch {
	case err == nil:
		return exitOK
	case errors.As(err, &dnsErr):
		return exitResolve
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &netErr) && netErr.Timeout():
		return exitTimeout
	case errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH):
		return exitConnect
	case errors.Is(err, syscall.ECONNRESET):
		return exitRecvError
	case errors.Is(err, syscall.EPIPE):
		return exitSendError
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return exitEmptyReply
	}
	return exitRecvError
}

func curlMain(args []string, stdout, stderr io.Writer) int {
	o, err := parseCurlArgs(args)
	if err != nil {
		fmt.Fprintf(stderr, "curl: %v\n", err)
		return exitUsage
	}
	out := stdout
	if o.Output != "" && o.Output != "-" {
		f, err := os.Create(o.Output)
		if err != nil {
			fmt.Fprintf(stderr, "curl: (23) %v\n", err)
			return exitWrite
		}
		defer f.Close()
		out = f
	}
	client := newClient(o)
	code := exitOK
	for range o.Repeat {
		for _, raw := range o.URLs {
			if c := fetchOne(client, o, raw, stdout, out, stderr); c != exitOK {
				code = c
			}
		}
	}
	return code
}

func newClient(o curlOptions) *http.Client {
	dialer := &net.Dialer{Timeout: o.ConnectTimeout}
	return &http.Client{
		Timeout: o.MaxTime,
		// Every request on a fresh connection, as separate curl runs would be:
		// that is what makes per-connection load balancing visible.
		Transport: &http.Transport{
			DialContext:       dialer.DialContext,
			DisableKeepAlives: true,
			TLSClientConfig:   &tls.Config{InsecureSkipVerify: true}, //nolint:gosec // lab test client, -k semantics
		},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}

// fetchOne performs one request; meta (status line, -w output) goes to
// stdout, the body to out.
func fetchOne(client *http.Client, o curlOptions, raw string, stdout, out, stderr io.Writer) int {
	u, err := normalizeURL(raw)
	if err != nil {
		fmt.Fprintf(stderr, "curl: (3) %v\n", err)
		return exitBadURL
	}
	req, err := buildRequest(o, u)
	if err != nil {
		fmt.Fprintf(stderr, "curl: (3) %v\n", err)
		return exitBadURL
	}
	if o.Verbose {
		fmt.Fprintf(stderr, "> %s %s HTTP/1.1\n> Host: %s\n", req.Method, u.RequestURI(), u.Host)
	}
	resp, err := client.Do(req)
	if err != nil {
		code := exitCodeFor(err)
		if !o.Silent || o.ShowError || o.Verbose {
			fmt.Fprintf(stderr, "curl: (%d) %v\n", code, err)
		}
		return code
	}
	defer resp.Body.Close()
	if o.Fail && resp.StatusCode >= 400 {
		if !o.Silent || o.ShowError {
			fmt.Fprintf(stderr, "curl: (22) The requested URL returned error: %d\n", resp.StatusCode)
		}
		return exitHTTPError
	}
	if o.Head || o.Include || o.Verbose {
		writeHead(stdout, resp)
	}
	if !o.Head {
		if _, err := io.Copy(out, resp.Body); err != nil {
			code := exitCodeFor(err)
			if !o.Silent || o.ShowError {
				fmt.Fprintf(stderr, "curl: (%d) %v\n", code, err)
			}
			return code
		}
	}
	if o.WriteOut != "" {
		fmt.Fprint(stdout, expandWriteOut(o.WriteOut, resp))
	}
	return exitOK
}

func buildRequest(o curlOptions, u *url.URL) (*http.Request, error) {
	method := o.Method
	var body io.Reader
	switch {
	case method != "":
	case o.Head:
		method = http.MethodHead
	case o.HasData:
		method = http.MethodPost
	default:
		method = http.MethodGet
	}
	if o.HasData {
		body = strings.NewReader(o.Data)
	}
	req, err := http.NewRequest(method, u.String(), body)
	if err != nil {
		return nil, err
	}
	req.Header.Set("User-Agent", "curl/8.0 (ambient-lab)")
	req.Header.Set("Accept", "*/*")
	if o.HasData {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	for _, h := range o.Headers {
		name, val, ok := strings.Cut(h, ":")
		if !ok || strings.TrimSpace(name) == "" {
			return nil, fmt.Errorf("bad header %q", h)
		}
		if strings.EqualFold(strings.TrimSpace(name), "Host") {
			req.Host = strings.TrimSpace(val)
			continue
		}
		req.Header.Set(strings.TrimSpace(name), strings.TrimSpace(val))
	}
	return req, nil
}

func writeHead(w io.Writer, resp *http.Response) {
	fmt.Fprintf(w, "HTTP/%d.%d %s\r\n", resp.ProtoMajor, resp.ProtoMinor, resp.Status)
	names := make([]string, 0, len(resp.Header))
	for k := range resp.Header {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		for _, v := range resp.Header[k] {
			fmt.Fprintf(w, "%s: %s\r\n", k, v)
		}
	}
	fmt.Fprint(w, "\r\n")
}

// expandWriteOut supports the -w variables the lab uses.
func expandWriteOut(format string, resp *http.Response) string {
	return strings.NewReplacer(
		`%{http_code}`, fmt.Sprintf("%03d", resp.StatusCode),
		`%{response_code}`, fmt.Sprintf("%03d", resp.StatusCode),
		`\n`, "\n",
		`\t`, "\t",
	).Replace(format)
}
