//go:build linux

package fuseoverlayfs

import (
	"context"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/log"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// TestWatcherReportsDeadServer kills the fuse-overlayfs server of a mounted
// active snapshot by PID: the watcher logs the mount point and the snapshot
// key within seconds and counts it; the sampler sees the server before.
func TestWatcherReportsDeadServer(t *testing.T) {
	testutil.RequireFUSE(t)
	ctx := context.Background()
	root := t.TempDir()
	s, err := NewSnapshotter(root)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = s.Close() }()
	o := s.(*snapshotter)
	if _, err := s.Prepare(ctx, "base-active", ""); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(ctx, "base", "base-active"); err != nil {
		t.Fatal(err)
	}
	mounts, err := s.Prepare(ctx, "container-rootfs", "base")
	if err != nil {
		t.Fatal(err)
	}
	target := t.TempDir()
	if err := mount.All(mounts, target); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = unix.Unmount(target, unix.MNT_DETACH) }()

	var servers []*server
	if err := pollFor(10*time.Second, func() bool {
		o.watch.mu.Lock()
		defer o.watch.mu.Unlock()
		servers = servers[:0]
		for _, sv := range o.watch.servers {
			servers = append(servers, sv)
		}
		return len(servers) == 1
	}); err != nil {
		t.Fatalf("the watcher does not track the server of %s: %v", target, servers)
	}
	if st := o.watch.stats(); st.servers != 1 || st.rss <= 0 || st.fds <= 0 {
		t.Fatalf("stats %+v", st)
	}
	var logs strings.Builder
	log.L.Logger.AddHook(&captureHook{w: &logs})
	before := counterValue(t, "running")
	if err := syscall.Kill(servers[0].pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if err := pollFor(5*time.Second, func() bool { return counterValue(t, "running") == before+1 }); err != nil {
		t.Fatalf("dead server not counted (%+v)", servers[0])
	}
	if got := logs.String(); !strings.Contains(got, target) || !strings.Contains(got, "container-rootfs") {
		t.Fatalf("log does not name the mount and the key: %q", got)
	}
	if st := o.watch.stats(); st.dead != 1 || st.servers != 0 {
		t.Fatalf("stats after the kill %+v", st)
	}
	if err := unix.Unmount(target, unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	if err := pollFor(5*time.Second, func() bool { return o.watch.stats().dead == 0 }); err != nil {
		t.Fatal("the dead mount is still counted after its unmount")
	}
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
