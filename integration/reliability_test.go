package integration

import (
	"context"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"

	fuseoverlayfs "github.com/fosnap/fuseoverlayfs"
	"github.com/fosnap/fuseoverlayfs/integration/internal/harness"
	"github.com/fosnap/fuseoverlayfs/integration/internal/images"
	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// snapshotterRoot is where our plugin keeps its data in e's containerd.
func (e *env) snapshotterRoot() string {
	return filepath.Join(e.c.Root, "io.containerd.snapshotter.v1."+sn)
}

// TestDeadFUSEServer kills the fuse-overlayfs server of a running container:
// the container's file accesses fail, and removing the container and its
// snapshot still works and leaves nothing behind.
func TestDeadFUSEServer(t *testing.T) {
	e := newEnv(t)
	ref := e.fx.refs[e.fx.features.Repo]
	e.ctr("images", "pull", "--plain-http", "--snapshotter", sn, ref)
	e.ctr("run", "-d", "--snapshotter", sn, ref, "dead", images.ProbePath, "pause")
	e.waitFuseMount("dead")
	upper := e.upperdir("default", "dead")
	snapDir := filepath.Dir(upper)
	pids := testutil.FUSEProcesses(upper)
	if len(pids) != 1 {
		t.Fatalf("want one fuse-overlayfs server for %s, found %v", upper, pids)
	}
	if err := syscall.Kill(pids[0], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// The container's files are gone with their server: read one through
	// the container's own root, as its processes would.
	pid := e.taskPID("default", "dead")
	err := harness.Poll(30*time.Second, 100*time.Millisecond, func() error {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/root/layer1.txt", pid))
		if err == nil {
			return fmt.Errorf("the container still reads its files: %q", b)
		}
		if !errors.Is(err, syscall.ENOTCONN) {
			return fmt.Errorf("reading a file of the container: %w, want ENOTCONN", err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	e.stopTaskKill("default", "dead")
	e.ctr("containers", "rm", "dead")
	if _, ok := e.snapshots("default", sn)["dead"]; ok {
		t.Fatal("snapshot of the removed container still listed")
	}
	// The garbage collector's Cleanup frees the directory.
	e.ctr("images", "rm", "--sync", ref)
	err = harness.Poll(30*time.Second, 100*time.Millisecond, func() error {
		if _, err := os.Stat(snapDir); !os.IsNotExist(err) {
			return fmt.Errorf("%s still exists (stat: %w)", snapDir, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// taskPID returns the PID of a task's init process, from `ctr tasks ls`.
func (e *env) taskPID(ns, id string) int {
	e.t.Helper()
	for _, line := range strings.Split(e.ctr("-n", ns, "tasks", "ls"), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == id {
			pid, err := strconv.Atoi(f[1])
			if err != nil {
				e.t.Fatalf("tasks ls: %q", line)
			}
			return pid
		}
	}
	e.t.Fatalf("task %s not listed", id)
	return 0
}

// stopTaskKill kills a task with SIGKILL and deletes it.
func (e *env) stopTaskKill(ns, id string) {
	e.t.Helper()
	e.ctr("-n", ns, "tasks", "kill", "-s", "SIGKILL", id)
	err := harness.Poll(30*time.Second, 100*time.Millisecond, func() error {
		_, err := e.c.Ctr(e.ctx, "-n", ns, "tasks", "delete", id)
		return err
	})
	if err != nil {
		e.t.Fatal(err)
	}
}

// openFDs counts the open file descriptors of pid.
func openFDs(t *testing.T, pid int) int {
	t.Helper()
	entries, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}

// TestNoLeaks runs and removes 200 containers: no fuse-overlayfs process or
// mount remains and containerd's open file descriptors return to their level
// before the runs.
func TestNoLeaks(t *testing.T) {
	e := newEnv(t)
	ref := e.fx.refs[e.fx.features.Repo]
	e.ctr("images", "pull", "--plain-http", "--snapshotter", sn, ref)
	// One run first, so what containerd opens once (shim and event
	// connections) is part of the baseline.
	e.ctr("run", "--rm", "--snapshotter", sn, ref, "warm")
	start := openFDs(t, e.c.PID())
	const runs = 200
	for i := range runs {
		out := e.ctr("run", "--rm", "--snapshotter", sn, ref, fmt.Sprintf("leak-%d", i))
		if out != featuresOutput {
			t.Fatalf("run %d: output %q", i, out)
		}
	}
	// containerd itself still runs: look only for FUSE servers and mounts.
	testutil.RequireNoLeftovers(t, e.dir)
	var now int
	err := harness.Poll(30*time.Second, 200*time.Millisecond, func() error {
		if now = openFDs(t, e.c.PID()); now > start {
			return fmt.Errorf("containerd has %d open fds, %d before the runs", now, start)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	snaps := e.snapshots("default", sn)
	for k, s := range snaps {
		if s.Kind != "Committed" {
			t.Fatalf("snapshot %s (%s) outlived its container", k, s.Kind)
		}
	}
	t.Logf("%d runs: containerd fds %d before, %d after; no fuse-overlayfs mount or process left", runs, start, now)
}

// orphanShims returns the PIDs of runc shims serving this containerd whose
// task no namespace lists.
func (e *env) orphanShims() []int {
	e.t.Helper()
	known := map[string]bool{}
	for _, ns := range strings.Fields(e.ctr("namespaces", "ls", "-q")) {
		for _, id := range strings.Fields(e.ctr("-n", ns, "tasks", "ls", "-q")) {
			known[ns+"/"+id] = true
		}
	}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		e.t.Fatal(err)
	}
	var pids []int
	for _, en := range entries {
		pid, err := strconv.Atoi(en.Name())
		if err != nil {
			continue
		}
		raw, err := os.ReadFile(filepath.Join("/proc", en.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(strings.TrimRight(string(raw), "\x00"), "\x00")
		if filepath.Base(args[0]) != "containerd-shim-runc-v2" || !slices.Contains(args, e.c.Address) {
			continue
		}
		var ns, id string
		for i := 0; i+1 < len(args); i++ {
			switch args[i] {
			case "-namespace":
				ns = args[i+1]
			case "-id":
				id = args[i+1]
			}
		}
		if !known[ns+"/"+id] {
			pids = append(pids, pid)
		}
	}
	return pids
}

// storeState reads our snapshotter's metadata while containerd is down:
// snapshot ID -> kind.
func storeState(root string) (map[string]snapshots.Kind, error) {
	ms, err := storage.NewMetaStore(filepath.Join(root, "metadata.db"))
	if err != nil {
		return nil, err
	}
	defer func() { _ = ms.Close() }()
	ids := map[string]snapshots.Kind{}
	// The store is not namespaced: containerd puts the namespace in the key.
	err = ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
			id, _, _, err := storage.GetInfo(ctx, info.Name)
			if err != nil {
				return err
			}
			ids[id] = info.Kind
			return nil
		})
	})
	if err != nil && !errdefs.IsNotFound(err) {
		return nil, err
	}
	return ids, nil
}

// TestCrashConsistency kills containerd with SIGKILL at random moments during
// pulls, unpacks, container starts and removals, 30 times. After each kill
// every committed layer still has the checksum it had when first seen
// committed; opening the root recovers it so that exactly the directories
// the store knows remain; after the restart pulls and runs work; and no
// mount or process is left. FOSNAP_CRASH_SEED replays a run.
func TestCrashConsistency(t *testing.T) {
	seed := testutil.Seed(t, "FOSNAP_CRASH_SEED")
	rounds := 30
	rnd := rand.New(rand.NewSource(seed))
	e := newEnv(t)
	refs := []string{e.fx.refs[e.fx.features.Repo], e.fx.refs[e.fx.pause.Repo]}
	root := e.snapshotterRoot()
	sums := map[string]string{} // committed snapshot ID -> tree checksum
	checked := 0

	for round := range rounds {
		// A burst of work in the crash namespace, killed part-way.
		ops := make([][]string, 0, 4)
		for range 1 + rnd.Intn(4) {
			ref := refs[rnd.Intn(len(refs))]
			name := fmt.Sprintf("r%d-%d", round, len(ops))
			switch rnd.Intn(4) {
			case 0:
				ops = append(ops, []string{"-n", "crash", "images", "pull", "--plain-http", "--snapshotter", sn, ref})
			case 1:
				ops = append(ops, []string{"-n", "crash", "images", "rm", "--sync", ref})
			case 2:
				ops = append(ops, []string{"-n", "crash", "run", "--rm", "--snapshotter", sn, ref, name})
			default:
				ops = append(ops, []string{"-n", "crash", "containers", "create", "--snapshotter", sn, ref, name},
					[]string{"-n", "crash", "containers", "rm", name})
			}
		}
		delay := time.Duration(rnd.Intn(1500)) * time.Millisecond
		done := make(chan struct{})
		go func() {
			defer close(done)
			for _, op := range ops {
				// Errors are expected: containerd dies under them.
				_, _ = e.c.Ctr(e.ctx, op...)
			}
		}()
		select {
		case <-done:
		case <-time.After(delay):
		}
		// SIGKILL by PID, as a crash; Kill returns once containerd exited.
		if !e.c.Kill() {
			t.Fatalf("round %d: containerd was not running at its kill; log tail:\n%s", round, e.c.LogTail(20))
		}
		<-done

		// containerd is down: check the committed layers against their sums.
		ids, err := storeState(root)
		if err != nil {
			t.Fatalf("round %d: read metadata: %v", round, err)
		}
		for id, kind := range ids {
			if kind != snapshots.KindCommitted {
				continue
			}
			sum, err := testutil.TreeSum(filepath.Join(root, "snapshots", id, "fs"))
			if err != nil {
				t.Fatalf("round %d: committed snapshot %s: %v", round, id, err)
			}
			if old, ok := sums[id]; ok && old != sum {
				t.Fatalf("round %d: committed snapshot %s changed after a crash", round, id)
			}
			sums[id] = sum
			checked++
		}
		// Opening the root (what the plugin does at load) recovers it:
		// exactly the directories the store knows remain.
		s, err := fuseoverlayfs.NewSnapshotter(root)
		if err != nil {
			t.Fatalf("round %d: open root: %v", round, err)
		}
		if err := s.(snapshots.Cleaner).Cleanup(namespaces.WithNamespace(e.ctx, "crash")); err != nil {
			t.Fatalf("round %d: cleanup: %v", round, err)
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		entries, err := os.ReadDir(filepath.Join(root, "snapshots"))
		if err != nil {
			t.Fatal(err)
		}
		var dirs, known []string
		for _, en := range entries {
			dirs = append(dirs, en.Name())
		}
		for id := range ids {
			known = append(known, id)
		}
		slices.Sort(dirs)
		slices.Sort(known)
		if !slices.Equal(dirs, known) {
			t.Fatalf("round %d: after recovery directories %v, store knows %v", round, dirs, known)
		}

		if err := e.c.Restart(e.ctx); err != nil {
			t.Fatalf("round %d: restart: %v", round, err)
		}
		if _, err := e.c.Sweep(e.ctx); err != nil {
			t.Fatalf("round %d: sweep: %v", round, err)
		}
		// A shim started just before the kill, whose task containerd never
		// recorded, is containerd's orphan, not ours: end it by PID.
		for _, pid := range e.orphanShims() {
			t.Logf("round %d: ending shim %d that containerd lost in the crash", round, pid)
			_ = syscall.Kill(-pid, syscall.SIGKILL)
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		// Pulls and runs work after every crash.
		ref := refs[0]
		e.ctr("-n", "crash", "images", "pull", "--plain-http", "--snapshotter", sn, ref)
		if out := e.ctr("-n", "crash", "run", "--rm", "--snapshotter", sn, ref, fmt.Sprintf("check-%d", round)); out != featuresOutput {
			t.Fatalf("round %d: container output %q", round, out)
		}
		testutil.RequireNoLeftovers(t, e.dir)
	}
	t.Logf("%d rounds survived; %d committed-layer checks against %d distinct layers", rounds, checked, len(sums))
}
