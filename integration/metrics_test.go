package integration

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/moby/sys/mountinfo"

	"github.com/fosnap/fuseoverlayfs/integration/internal/harness"
	"github.com/fosnap/fuseoverlayfs/integration/internal/images"
)

// freeAddr returns a loopback address with a port nobody listens on now.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	_ = l.Close()
	return addr
}

// scrape reads the metrics at http://addr/v1/metrics into name{labels} ->
// value.
func scrape(t *testing.T, addr string) map[string]float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/v1/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = resp.Body.Close() }()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, line := range strings.Split(string(body), "\n") {
		if !strings.HasPrefix(line, "containerd_fuse_overlayfs_") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err == nil {
			out[line[:i]] = v
		}
	}
	return out
}

// waitMetrics scrapes until every want holds (the sampled gauges lag by
// up to 10 s) and returns the last scrape.
func waitMetrics(t *testing.T, addr, when string, want map[string]func(float64) bool) map[string]float64 {
	t.Helper()
	var m map[string]float64
	err := harness.Poll(30*time.Second, 500*time.Millisecond, func() error {
		m = scrape(t, addr)
		for k, ok := range want {
			v, found := m[k]
			if !found || !ok(v) {
				return fmt.Errorf("%s: %s = %v (present %v)", when, k, v, found)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func eq(n float64) func(float64) bool { return func(v float64) bool { return v == n } }
func ge(n float64) func(float64) bool { return func(v float64) bool { return v >= n } }

// TestMetrics scrapes a real containerd's /v1/metrics (built-in plugin) and
// the proxy server's --metrics-address after a pull, a run, a kill of the
// container's fuse-overlayfs server by PID, and the removal.
func TestMetrics(t *testing.T) {
	t.Run("builtin", func(t *testing.T) {
		addr := freeAddr(t)
		e := newEnv(t, func(o *harness.Options) {
			prev := o.Edit
			o.Edit = func(cfg map[string]any) {
				if prev != nil {
					prev(cfg)
				}
				harness.Set(cfg, addr, "metrics", "address")
			}
		})
		metricsScenario(t, e, addr, e.c.LogPath, "metrics-builtin")
	})
	t.Run("proxy", func(t *testing.T) {
		e, p := newProxyEnv(t, 1)
		addr := freeAddr(t)
		p.stop()
		p.Args = []string{"--metrics-address", addr}
		if err := p.Start(); err != nil {
			t.Fatal(err)
		}
		metricsScenario(t, e, addr, p.LogPath, "metrics-proxy")
	})
}

func metricsScenario(t *testing.T, e *env, addr, logPath, id string) {
	ref := e.fx.refs[e.fx.features.Repo]
	layers := float64(len(e.fx.features.Layers))
	e.ctr("images", "pull", "--plain-http", "--snapshotter", sn, ref)
	m := waitMetrics(t, addr, "after pull", map[string]func(float64) bool{
		`containerd_fuse_overlayfs_snapshots{kind="committed"}`:                  ge(layers - 2), // empty layers may share a chain ID
		`containerd_fuse_overlayfs_snapshots{kind="active"}`:                     eq(0),
		`containerd_fuse_overlayfs_committed_layers_bytes`:                       ge(1),
		`containerd_fuse_overlayfs_committed_layers_inodes`:                      ge(layers),
		`containerd_fuse_overlayfs_unpacks_total{path="direct",result="ok"}`:     ge(layers - 2),
		`containerd_fuse_overlayfs_unpacks_total{path="direct",result="error"}`:  eq(0),
		`containerd_fuse_overlayfs_unpacked_bytes_total{path="direct"}`:          ge(1),
		`containerd_fuse_overlayfs_unpack_duration_seconds_count{path="direct"}`: ge(layers - 2),
		`containerd_fuse_overlayfs_mounts{state="live"}`:                         eq(0),
		`containerd_fuse_overlayfs_servers`:                                      eq(0),
	})
	committed := m[`containerd_fuse_overlayfs_snapshots{kind="committed"}`]
	t.Logf("after pull: %v", m)

	e.ctr("run", "-d", "--snapshotter", sn, ref, id, images.ProbePath, "churn", churnFile)
	m = waitMetrics(t, addr, "container running", map[string]func(float64) bool{
		`containerd_fuse_overlayfs_snapshots{kind="active"}`:      eq(1),
		`containerd_fuse_overlayfs_mounts{state="live"}`:          eq(1),
		`containerd_fuse_overlayfs_mounts{state="dead"}`:          eq(0),
		`containerd_fuse_overlayfs_servers`:                       eq(1),
		`containerd_fuse_overlayfs_servers_resident_memory_bytes`: ge(1 << 20),
		`containerd_fuse_overlayfs_servers_open_fds`:              ge(3),
	})
	t.Logf("container running: %v", m)

	fusePID := fuseServerOf(t, e, id)
	if err := syscall.Kill(fusePID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	m = waitMetrics(t, addr, "server killed", map[string]func(float64) bool{
		`containerd_fuse_overlayfs_dead_mounts_found_total{when="running"}`: eq(1),
		// The watcher detaches the dead mount, so that the task can be
		// deleted below however long the kernel's attribute cache has
		// expired: no mount is left to count.
		`containerd_fuse_overlayfs_mounts{state="dead"}`: eq(0),
		`containerd_fuse_overlayfs_mounts{state="live"}`: eq(0),
		`containerd_fuse_overlayfs_servers`:              eq(0),
	})
	rootfs := filepath.Join(e.c.State, "io.containerd.runtime.v2.task", "default", id, "rootfs")
	if mounted, err := mountinfo.Mounted(rootfs); err != nil || mounted {
		t.Fatalf("the container's rootfs %s after its server died: mounted %v, %v; want detached", rootfs, mounted, err)
	}
	// Logged, not asserted: how soon depends on the machine's load, and
	// waitMetrics already fails if the watcher never notices.
	t.Logf("server killed, noticed within %s: %v", time.Since(killed).Round(time.Second), m)
	logData, _ := os.ReadFile(logPath)
	line := regexp.MustCompile(`.*fuse-overlayfs server died under a mounted snapshot.*`).Find(logData)
	if line == nil || !strings.Contains(string(line), "/"+id+"/rootfs") {
		t.Fatalf("no log line naming the mount and the snapshot key; log line: %q", line)
	}
	if !strings.Contains(string(line), id) {
		t.Fatalf("log line does not name the snapshot key %q: %s", id, line)
	}
	t.Logf("log: %s", line)

	// The container's process may have died on ENOTCONN already.
	_, _ = e.c.Ctr(e.ctx, "tasks", "kill", "-s", "SIGKILL", id)
	if err := harness.Poll(20*time.Second, 200*time.Millisecond, func() error {
		_, err := e.c.Ctr(e.ctx, "tasks", "rm", "-f", id)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	e.ctr("containers", "rm", id)
	waitMetrics(t, addr, "container removed", map[string]func(float64) bool{
		`containerd_fuse_overlayfs_snapshots{kind="active"}`:                eq(0),
		`containerd_fuse_overlayfs_snapshots{kind="committed"}`:             eq(committed),
		`containerd_fuse_overlayfs_mounts{state="dead"}`:                    eq(0),
		`containerd_fuse_overlayfs_mounts{state="live"}`:                    eq(0),
		`containerd_fuse_overlayfs_dead_mounts_found_total{when="running"}`: eq(1),
	})
}
