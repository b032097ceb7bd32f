// Command h2spec runs h2spec's HTTP/2 conformance cases (github.com/summerwind/h2spec, its
// library packages, pinned by go.sum) against a server, and can present a TLS client
// certificate: nodeway's HBONE server requires mutual TLS with a SPIFFE certificate, which the
// stock CLI cannot send. The server's certificate is not verified (it is a SPIFFE identity,
// checked by the test that runs this).
//
// Every case ends as one line `PASS|FAIL|SKIP <id>` (`<id>` like `http2/5.1/9`), and the run
// with `h2spec: passed=N failed=N skipped=N`. `-exclude` lists case IDs that are not run
// (counted as skipped). The exit code is 0 when the run completed, whatever the results: the
// caller asserts them.
package main

import (
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/summerwind/h2spec/config"
	"github.com/summerwind/h2spec/generic"
	"github.com/summerwind/h2spec/hpack"
	"github.com/summerwind/h2spec/http2"
	"github.com/summerwind/h2spec/spec"
)

func main() {
	host := flag.String("host", "127.0.0.1", "target host")
	port := flag.Int("port", 0, "target port")
	path := flag.String("path", "/", "target path")
	timeout := flag.Int("timeout", 2, "seconds each case waits for the server")
	maxHeaderLen := flag.Int("max-header-length", 4000, "largest header value h2spec sends")
	useTLS := flag.Bool("tls", false, "connect over TLS (ALPN h2)")
	cert := flag.String("cert", "", "client certificate chain (PEM), with -tls")
	key := flag.String("key", "", "client private key (PEM), with -tls")
	exclude := flag.String("exclude", "", "comma-separated case IDs not to run, e.g. http2/3.5/2")
	flag.Parse()
	if *port == 0 {
		fmt.Fprintln(os.Stderr, "h2spec: -port is required")
		os.Exit(2)
	}
	c := &config.Config{
		Host:         *host,
		Port:         *port,
		Path:         *path,
		Timeout:      time.Duration(*timeout) * time.Second,
		MaxHeaderLen: *maxHeaderLen,
		TLS:          *useTLS,
		Insecure:     true,
		CertFile:     *cert,
		CertKeyFile:  *key,
	}
	excluded := map[string]bool{}
	for _, id := range strings.Split(*exclude, ",") {
		if id = strings.TrimSpace(id); id != "" {
			excluded[id] = true
		}
	}
	groups := []*spec.TestGroup{generic.Spec(), http2.Spec(), hpack.Spec()}
	for _, g := range groups {
		skipExcluded(g, excluded)
	}
	for _, g := range groups {
		g.Test(c)
	}
	var passed, failed, skipped int
	for _, g := range groups {
		report(g, &passed, &failed, &skipped)
	}
	fmt.Printf("h2spec: passed=%d failed=%d skipped=%d\n", passed, failed, skipped)
}

func skipExcluded(g *spec.TestGroup, excluded map[string]bool) {
	for i, tc := range g.Tests {
		if excluded[fmt.Sprintf("%s/%d", g.ID(), i+1)] {
			tc.Run = func(*config.Config, *spec.Conn) error { return spec.ErrSkipped }
		}
	}
	for _, sub := range g.Groups {
		skipExcluded(sub, excluded)
	}
}

func report(g *spec.TestGroup, passed, failed, skipped *int) {
	for i, tc := range g.Tests {
		if tc.Result == nil {
			continue
		}
		id := fmt.Sprintf("%s/%d", g.ID(), i+1)
		switch {
		case tc.Result.Failed:
			*failed++
			fmt.Printf("FAIL %s %s\n", id, tc.Desc)
		case tc.Result.Skipped:
			*skipped++
			fmt.Printf("SKIP %s %s\n", id, tc.Desc)
		default:
			*passed++
			fmt.Printf("PASS %s %s\n", id, tc.Desc)
		}
	}
	for _, sub := range g.Groups {
		report(sub, passed, failed, skipped)
	}
}
