// Command httpbin is the lab's small stand-in for httpbin.org: an HTTP server
// whose root page carries <title>httpbin.org</title> (what the seeds' journey
// greps for) and which says which pod answered, so round robin is visible.
// It also runs a line echo server on a second port for long-lived TCP
// connections (used to count connections broken by a proxy upgrade).
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// maxDelay bounds /delay/N so a hostile request cannot park a goroutine forever.
const maxDelay = 10 * time.Second

func main() {
	httpAddr := flag.String("http", ":80", "HTTP listen address")
	echoAddr := flag.String("echo", ":9000", "TCP line-echo listen address (empty: off)")
	httpsAddr := flag.String("https", "", "HTTPS listen address (empty: off); needs -tls-cert and -tls-key")
	tlsCert := flag.String("tls-cert", "", "HTTPS certificate (PEM)")
	tlsKey := flag.String("tls-key", "", "HTTPS private key (PEM)")
	flag.Parse()

	host, _ := os.Hostname()
	srv := &http.Server{
		Addr:              *httpAddr,
		Handler:           newHandler(host),
		ReadHeaderTimeout: 10 * time.Second,
		MaxHeaderBytes:    64 << 10,
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if *echoAddr != "" {
		ln, err := net.Listen("tcp", *echoAddr)
		if err != nil {
			log.Fatalf("echo listen: %v", err)
		}
		go serveEcho(ln, host)
	}
	if *httpsAddr != "" {
		ln, err := tlsListener(*httpsAddr, *tlsCert, *tlsKey)
		if err != nil {
			log.Fatalf("https: %v", err)
		}
		hs := &http.Server{Handler: srv.Handler, ReadHeaderTimeout: srv.ReadHeaderTimeout, MaxHeaderBytes: srv.MaxHeaderBytes}
		go func() { log.Printf("https: %v", hs.Serve(ln)) }()
	}
	go func() {
		<-ctx.Done()
		shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(shutdown)
	}()
	log.Printf("httpbin %s listening on %s", host, *httpAddr)
	if err := srv.ListenAndServe(); err != http.ErrServerClosed {
		log.Fatal(err)
	}
}

// newHandler serves the httpbin-like endpoints; host names the answering pod.
func newHandler(host string) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		fmt.Fprintf(w, "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n    <meta charset=\"UTF-8\">\n    <title>httpbin.org</title>\n</head>\n<body>\n<h1>httpbin.org</h1>\n<p>A simple HTTP request &amp; response service, served by %s.</p>\n</body>\n</html>\n", htmlEscape(host))
	})
	mux.HandleFunc("/headers", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, map[string]any{"headers": flatHeaders(r)})
	})
	mux.HandleFunc("/ip", func(w http.ResponseWriter, r *http.Request) {
		ip, _, _ := net.SplitHostPort(r.RemoteAddr)
		writeJSON(w, map[string]string{"origin": ip})
	})
	mux.HandleFunc("/hostname", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		fmt.Fprintln(w, host)
	})
	mux.HandleFunc("/get", func(w http.ResponseWriter, r *http.Request) {
		ip, _, _ := net.SplitHostPort(r.RemoteAddr)
		writeJSON(w, map[string]any{"args": r.URL.Query(), "headers": flatHeaders(r), "origin": ip, "url": r.URL.String(), "hostname": host})
	})
	mux.HandleFunc("/status/{code}", func(w http.ResponseWriter, r *http.Request) {
		code, err := strconv.Atoi(r.PathValue("code"))
		if err != nil || code < 100 || code > 599 {
			http.Error(w, "invalid status code", http.StatusBadRequest)
			return
		}
		w.WriteHeader(code)
	})
	mux.HandleFunc("/delay/{seconds}", func(w http.ResponseWriter, r *http.Request) {
		secs, err := strconv.ParseFloat(r.PathValue("seconds"), 64)
		if err != nil || secs < 0 {
			http.Error(w, "invalid delay", http.StatusBadRequest)
			return
		}
		d := min(time.Duration(secs*float64(time.Second)), maxDelay)
		select {
		case <-time.After(d):
		case <-r.Context().Done():
			return
		}
		writeJSON(w, map[string]any{"delay": d.Seconds(), "hostname": host})
	})
	return serverHeader(mux)
}

func serverHeader(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Server", "ambient-lab-httpbin")
		next.ServeHTTP(w, r)
	})
}

// flatHeaders returns request headers with one comma-joined value per name,
// including Host, which net/http moves out of the header map.
func flatHeaders(r *http.Request) map[string]string {
	out := map[string]string{"Host": r.Host}
	for k, v := range r.Header {
		out[k] = strings.Join(v, ",")
	}
	return out
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func htmlEscape(s string) string {
	return strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;", `"`, "&quot;").Replace(s)
}

// serveEcho echoes every line back prefixed with the host name, so a client
// holding a connection open can both detect breakage and see who answers.
// tlsListener serves TLS with the given key pair (a TLS passthrough
// backend: only it holds the key the client checks).
func tlsListener(addr, certFile, keyFile string) (net.Listener, error) {
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	return tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS12}), nil
}

func serveEcho(ln net.Listener, host string) {
	for {
		c, err := ln.Accept()
		if err != nil {
			log.Printf("echo accept: %v", err)
			return
		}
		go echoLines(c, host)
	}
}

func echoLines(c net.Conn, host string) {
	defer c.Close()
	sc := bufio.NewScanner(c)
	sc.Buffer(make([]byte, 4096), 64<<10)
	for {
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Minute))
		if !sc.Scan() {
			return
		}
		if _, err := fmt.Fprintf(c, "%s %s\n", host, sc.Text()); err != nil {
			return
		}
	}
}
