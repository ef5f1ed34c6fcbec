package main

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"github.com/docker/go-metrics"

	"github.com/fosnap/fuseoverlayfs/differ"
	"github.com/fosnap/fuseoverlayfs/monitor"
)

// metricsPath is where the metrics are served, as containerd serves its own.
const metricsPath = "/v1/metrics"

// checkMetricsAddress accepts what --metrics-address may be: a TCP address
// on the loopback interface (127.0.0.1:PORT, [::1]:PORT, localhost:PORT) or a
// unix socket (unix:/PATH). The metrics tell who runs which containers and
// how much memory they use: they are not served on other interfaces; put a
// reverse proxy or the node's Prometheus agent in front to reach them from
// elsewhere.
func checkMetricsAddress(addr string) error {
	if p, ok := strings.CutPrefix(addr, "unix:"); ok {
		if !filepath.IsAbs(p) {
			return fmt.Errorf("--metrics-address %q: a unix socket needs an absolute path (unix:/run/...): %w", addr, errdefs.ErrInvalidArgument)
		}
		return nil
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("--metrics-address %q: want 127.0.0.1:PORT, [::1]:PORT, localhost:PORT or unix:/PATH: %w: %w", addr, err, errdefs.ErrInvalidArgument)
	}
	if port == "" {
		return fmt.Errorf("--metrics-address %q: no port: %w", addr, errdefs.ErrInvalidArgument)
	}
	if host == "localhost" {
		return nil
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("--metrics-address %q: only loopback addresses (127.0.0.1, ::1, localhost) or a unix socket (unix:/PATH) are allowed: %w", addr, errdefs.ErrInvalidArgument)
	}
	return nil
}

// serveMetrics serves the default Prometheus registry (the snapshotter's and
// the differ's metrics, Go runtime and process metrics) on addr at
// /v1/metrics. A unix socket is made as listen makes the main socket (mode
// 0600 in a checked 0700 directory). The returned function stops it.
func serveMetrics(addr string) (func(), error) {
	monitor.Register()
	differ.RegisterMetrics()
	var l net.Listener
	var err error
	if p, ok := strings.CutPrefix(addr, "unix:"); ok {
		// The same checks and binding as the main socket: the metrics
		// tell who runs what, and a stale socket is replaced only when
		// no server answers on it.
		l, err = listen(p)
	} else {
		l, err = net.Listen("tcp", addr)
	}
	if err != nil {
		return nil, fmt.Errorf("metrics: listen on %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle(metricsPath, metrics.Handler())
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			_, _ = fmt.Fprintf(os.Stderr, "%s: metrics: %v\n", name, err)
		}
	}()
	return func() { _ = srv.Close() }, nil
}
