//go:build linux

package monitor

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/log"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/fosnap/fuseoverlayfs/internal/layout"
	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// registeredAtStart is whether the default registry held any of our metrics
// before a test called Register: importing the package must not add them.
var registeredAtStart bool

func TestMain(m *testing.M) {
	mfs, err := prometheus.DefaultGatherer.Gather()
	if err != nil {
		panic(err)
	}
	for _, mf := range mfs {
		if strings.HasPrefix(mf.GetName(), "containerd_fuse_overlayfs_") {
			registeredAtStart = true
		}
	}
	os.Exit(m.Run())
}

// TestImportRegistersNothing: only Register adds the metrics.
func TestImportRegistersNothing(t *testing.T) {
	if registeredAtStart {
		t.Fatal("importing monitor registered metrics in the default registry")
	}
	Register()
	Register() // a second call must not panic on a duplicate registration
	readCounter(t, "containerd_fuse_overlayfs_dead_mounts_found_total", "when", FoundRunning)
}

// mountLayer mounts, as the snapshotter would, an active snapshot (ID 2) on
// a committed one (ID 1) in a root laid out by internal/layout, and returns
// the mount point.
func mountLayer(t *testing.T, root layout.Root) string {
	t.Helper()
	for _, d := range []string{root.FS("1"), root.FS("2"), root.Work("2")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(root.FS("1"), "f"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	target := t.TempDir()
	m := layout.Overlay([]string{root.FS("1")}, root.FS("2"), root.Work("2"))
	if err := m.Mount(target); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(target, unix.MNT_DETACH) })
	return target
}

func startFor(t *testing.T, root layout.Root) *Handle {
	t.Helper()
	h := Start(Source{Root: string(root), KeyOf: func(id string) string {
		if id == "2" {
			return "container-rootfs"
		}
		return ""
	}})
	t.Cleanup(h.Close)
	if h.watch == nil {
		t.Fatal("the watcher did not start")
	}
	return h
}

// waitServers polls until the watcher tracks n servers and returns them.
func waitServers(t *testing.T, h *Handle, n int) []*server {
	t.Helper()
	var servers []*server
	if err := pollFor(10*time.Second, func() bool {
		h.watch.mu.Lock()
		defer h.watch.mu.Unlock()
		servers = servers[:0]
		for _, sv := range h.watch.servers {
			servers = append(servers, sv)
		}
		return len(servers) == n
	}); err != nil {
		t.Fatalf("the watcher tracks %v, want %d servers", servers, n)
	}
	return servers
}

// TestWatcherReportsDeadServer kills the fuse-overlayfs server of a mounted
// active snapshot by PID: the watcher logs the mount point and the snapshot
// key, counts it and detaches the dead mount; the sampler sees the server
// before.
func TestWatcherReportsDeadServer(t *testing.T) {
	testutil.RequireFUSE(t)
	Register()
	root := layout.Root(t.TempDir())
	target := mountLayer(t, root)
	h := startFor(t, root)
	servers := waitServers(t, h, 1)
	if st := h.watch.stats(); st.servers != 1 || st.live != 1 || st.rss <= 0 || st.fds <= 0 {
		t.Fatalf("stats %+v", st)
	}
	var logs strings.Builder
	log.L.Logger.AddHook(&captureHook{w: &logs})
	before := counterValue(t, FoundRunning)
	if err := syscall.Kill(servers[0].pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if err := pollFor(5*time.Second, func() bool { return counterValue(t, FoundRunning) == before+1 }); err != nil {
		t.Fatalf("dead server not counted (%+v)", servers[0])
	}
	if got := logs.String(); !strings.Contains(got, target) || !strings.Contains(got, "container-rootfs") {
		t.Fatalf("log does not name the mount and the key: %q", got)
	}
	// Detached, so that a container on it can be stopped: the mount point
	// is a plain directory again, not a mount, and nothing is left counted.
	if isMounted(target) {
		t.Fatalf("the dead mount %s is still mounted", target)
	}
	var st unix.Stat_t
	if err := unix.Lstat(target, &st); err != nil {
		t.Fatalf("lstat of the mount point after the detach: %v", err)
	}
	if st := h.watch.stats(); st.dead != 0 || st.live != 0 || st.servers != 0 {
		t.Fatalf("stats after the kill %+v", st)
	}
}

// TestLiveMountsFromMountTable detaches a mount while a file in it is open:
// its server keeps serving, but the mount is no longer in the mount table,
// so mounts{state="live"} drops to 0 while servers stays at 1. Closing the
// file ends the server.
func TestLiveMountsFromMountTable(t *testing.T) {
	testutil.RequireFUSE(t)
	root := layout.Root(t.TempDir())
	target := mountLayer(t, root)
	h := startFor(t, root)
	waitServers(t, h, 1)
	f, err := os.Open(filepath.Join(target, "f"))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	if err := unix.Unmount(target, unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	if st := h.watch.stats(); st.live != 0 || st.servers != 1 || st.dead != 0 {
		t.Fatalf("detached mount with an open file: stats %+v, want live 0, servers 1", st)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	waitServers(t, h, 0)
	testutil.RequireNoLeftovers(t, string(root))
}

type captureHook struct{ w *strings.Builder }

func (h *captureHook) Levels() []logrus.Level { return []logrus.Level{logrus.ErrorLevel} }
func (h *captureHook) Fire(e *logrus.Entry) error {
	s, _ := e.String()
	h.w.WriteString(s)
	return nil
}

func counterValue(t *testing.T, when string) float64 {
	t.Helper()
	return readCounter(t, "containerd_fuse_overlayfs_dead_mounts_found_total", "when", when)
}

// pollFor waits for cond, which reads state the watcher changes on events
// of its own (pidfd, mount table) that the test cannot wait on.
func pollFor(d time.Duration, cond func() bool) error {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			return os.ErrDeadlineExceeded
		}
		time.Sleep(50 * time.Millisecond)
	}
	return nil
}

// readCounter reads a counter of the default registry by one label.
func readCounter(t *testing.T, name, label, value string) float64 {
	t.Helper()
	mfs, err := prometheus.DefaultGatherer.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == label && l.GetValue() == value {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	t.Fatalf("no %s{%s=%q}", name, label, value)
	return 0
}
