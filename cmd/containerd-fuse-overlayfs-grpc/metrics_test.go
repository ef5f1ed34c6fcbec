package main

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// TestMetricsSocketChecks: a --metrics-address unix socket gets the main
// socket's checks: a directory others may enter, an ancestor others may
// write, a file that is not a socket and a socket a live server answers on
// are refused, leaving everything as it was; a stale socket is replaced,
// the metrics are served on a 0600 socket, and stopping removes it.
func TestMetricsSocketChecks(t *testing.T) {
	testutil.RequireRoot(t)
	base := shortDir(t)
	at := func(p ...string) string { return filepath.Join(append([]string{base}, p...)...) }
	mkdirOwned(t, at("open"), 0o777, 0)
	mkdirOwned(t, at("wide"), 0o755, 0)
	mkdirOwned(t, at("good"), 0o700, 0)
	if err := os.WriteFile(at("good", "file"), []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	live := liveSocket(t, at("good", "live.sock"))

	for _, tc := range []struct {
		name, socket, want string
		is                 func(error) bool
	}{
		{"ancestor others may write", at("open", "run", "m.sock"), "socket path ancestor " + at("open") + " (owner uid 0) has mode 0777", errdefs.IsFailedPrecondition},
		{"directory others may enter", at("wide", "m.sock"), "socket directory " + at("wide") + " has mode 0755, want 0700", errdefs.IsInvalidArgument},
		{"not a socket", at("good", "file"), at("good", "file") + " exists and is not a socket", errdefs.IsAlreadyExists},
		{"live socket", at("good", "live.sock"), "another server is listening on " + at("good", "live.sock"), errdefs.IsAlreadyExists},
	} {
		t.Run(tc.name, func(t *testing.T) {
			stop, err := serveMetrics("unix:" + tc.socket)
			if err == nil {
				stop()
				t.Fatalf("metrics served on %s, want an error containing %q", tc.socket, tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) || !tc.is(err) {
				t.Errorf("error %v, want one containing %q of the right class", err, tc.want)
			}
		})
	}
	if _, err := os.Lstat(at("open", "run")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s created below a refused ancestor: %v", at("open", "run"), err)
	}
	if b, err := os.ReadFile(at("good", "file")); err != nil || string(b) != "keep" {
		t.Errorf("file at the metrics address: %q, %v; want it untouched", b, err)
	}
	assertListens(t, live, at("good", "live.sock"))

	t.Run("stale socket replaced", func(t *testing.T) {
		socket := at("good", "m.sock")
		staleSocket(t, socket)
		stop, err := serveMetrics("unix:" + socket)
		if err != nil {
			t.Fatal(err)
		}
		if st, err := os.Lstat(socket); err != nil || st.Mode() != os.ModeSocket|0o600 {
			t.Errorf("metrics socket %s: %v, %v", socket, st, err)
		}
		if body := getMetrics(t, socket); !strings.Contains(body, "go_goroutines") {
			t.Errorf("metrics served on %s lack go_goroutines:\n%.500s", socket, body)
		}
		stop()
		if _, err := os.Lstat(socket); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("metrics socket %s left after stop: %v", socket, err)
		}
	})
}

// liveSocket listens on socket (its directory already checked by the
// caller's setup) and closes it at the end of the test.
func liveSocket(t *testing.T, socket string) net.Listener {
	t.Helper()
	l, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	return l
}

// staleSocket leaves a socket file at path that nobody answers on, as a
// server that died would.
func staleSocket(t *testing.T, path string) {
	t.Helper()
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Lstat(path); err != nil || st.Mode()&os.ModeSocket == 0 {
		t.Fatalf("stale socket %s: %v, %v", path, st, err)
	}
}

// getMetrics fetches the metrics page over the unix socket.
func getMetrics(t *testing.T, socket string) string {
	t.Helper()
	c := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", socket)
	}}}
	defer c.CloseIdleConnections()
	resp, err := c.Get("http://metrics" + metricsPath)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = resp.Body.Close() }()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s on %s: %s, %v", metricsPath, socket, resp.Status, err)
	}
	return string(b)
}
