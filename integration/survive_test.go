package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fosnap/fuseoverlayfs/integration/internal/harness"
	"github.com/fosnap/fuseoverlayfs/integration/internal/images"
)

// TestRunningContainerSurvives runs a container on fuse-overlayfs that
// writes and reads back a counter in its root filesystem, and takes away
// what served it while it runs: containerd stopped with SIGTERM, started,
// SIGKILLed, started again; with the proxy plugin also the proxy server
// stopped, started, SIGKILLed and started. Throughout, the counter keeps
// growing (the rootfs' fuse-overlayfs server, a child of the runc shim,
// not of containerd or the proxy server, stays); afterwards `ctr tasks
// exec` reads the file, and kill + rm leave no mount and no process.
func TestRunningContainerSurvives(t *testing.T) {
	t.Run("builtin", func(t *testing.T) {
		e := newEnv(t)
		s := startChurn(t, e, "survive-builtin")
		restartContainerd(t, e, s)
		s.finish(t)
	})
	t.Run("proxy", func(t *testing.T) {
		e, p := newProxyEnv(t, 1)
		s := startChurn(t, e, "survive-proxy")
		restartContainerd(t, e, s)
		p.stop()
		s.assertChurning(t, "proxy server stopped with SIGTERM")
		p.restart()
		if !p.Kill() {
			t.Fatal("proxy server had exited before its SIGKILL")
		}
		s.assertChurning(t, "proxy server SIGKILLed")
		p.restart()
		s.assertChurning(t, "proxy server started again")
		s.finish(t)
	})
}

// churner is a running container writing its counter.
type churner struct {
	e        *env
	id, ref  string
	pid      int
	fusePID  int
	lastSeen int
}

const churnFile = "/churn"

// startChurn runs the features image detached with `probe churn` and finds
// its task's PID and the fuse-overlayfs server of its rootfs, whose parent
// must be the container's shim.
func startChurn(t *testing.T, e *env, id string) *churner {
	t.Helper()
	ref := e.fx.refs[e.fx.features.Repo]
	e.ctr("images", "pull", "--plain-http", "--snapshotter", sn, ref)
	e.ctr("run", "-d", "--snapshotter", sn, ref, id, images.ProbePath, "churn", churnFile)
	s := &churner{e: e, id: id, ref: ref}
	s.pid = taskPID(t, e, id)
	s.fusePID = fuseServerOf(t, e, id)
	parent := parentCmdline(t, s.fusePID)
	if !strings.Contains(parent, "containerd-shim-runc-v2") {
		t.Fatalf("parent of the rootfs' fuse-overlayfs (pid %d) is %q, want the runc shim", s.fusePID, parent)
	}
	t.Logf("fuse-overlayfs pid %d serving %s; its parent: %s", s.fusePID, id, parent)
	s.assertChurning(t, "container started")
	return s
}

// restartContainerd takes containerd away under the running container.
func restartContainerd(t *testing.T, e *env, s *churner) {
	t.Helper()
	if err := e.c.Stop(); err != nil {
		t.Fatal(err)
	}
	s.assertChurning(t, "containerd stopped with SIGTERM")
	if err := e.c.Start(e.ctx); err != nil {
		t.Fatal(err)
	}
	if !e.c.Kill() {
		t.Fatal("containerd had exited before its SIGKILL")
	}
	s.assertChurning(t, "containerd SIGKILLed")
	if err := e.c.Start(e.ctx); err != nil {
		t.Fatal(err)
	}
	s.assertChurning(t, "containerd started again")
}

// assertChurning waits until the counter, read through the container's
// root (/proc/PID/root), has grown past what was seen last, and checks that
// the rootfs' fuse-overlayfs server is still the same process.
func (s *churner) assertChurning(t *testing.T, when string) {
	t.Helper()
	path := filepath.Join("/proc", strconv.Itoa(s.pid), "root", churnFile)
	err := harness.Poll(20*time.Second, 20*time.Millisecond, func() error {
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		n, err := strconv.Atoi(string(data))
		if err != nil {
			return nil // caught between its write and rename: look again
		}
		if n <= s.lastSeen {
			return fmt.Errorf("counter %d, not past %d", n, s.lastSeen)
		}
		s.lastSeen = n
		return nil
	})
	if err != nil {
		t.Fatalf("%s: the container no longer writes its rootfs: %v", when, err)
	}
	if _, err := os.Stat(filepath.Join("/proc", strconv.Itoa(s.fusePID))); err != nil {
		t.Fatalf("%s: the rootfs' fuse-overlayfs (pid %d) is gone: %v", when, s.fusePID, err)
	}
}

// finish execs into the container, then kills and removes it, and checks
// that its mount and fuse-overlayfs server are gone.
func (s *churner) finish(t *testing.T) {
	t.Helper()
	e := s.e
	out := e.ctr("tasks", "exec", "--exec-id", "look", s.id, images.ProbePath, "cat", churnFile)
	if n, err := strconv.Atoi(out); err != nil || n < s.lastSeen {
		t.Fatalf("ctr tasks exec cat %s: %q, want a counter of at least %d", churnFile, out, s.lastSeen)
	}
	e.ctr("tasks", "kill", "-s", "SIGTERM", s.id)
	if err := harness.Poll(20*time.Second, 50*time.Millisecond, func() error {
		_, err := e.c.Ctr(e.ctx, "tasks", "delete", s.id)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	e.ctr("containers", "rm", s.id)
	if err := harness.Poll(15*time.Second, 50*time.Millisecond, func() error {
		if m := e.fuseMounts(); len(m) > 0 {
			return fmt.Errorf("fuse mounts left: %v", m)
		}
		if st, err := procState(s.fusePID); err == nil && st != "Z" {
			return fmt.Errorf("fuse-overlayfs pid %d still runs (state %s)", s.fusePID, st)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	e.ctr("images", "rm", "--sync", s.ref)
}

func taskPID(t *testing.T, e *env, id string) int {
	t.Helper()
	for _, line := range strings.Split(e.ctr("tasks", "ls"), "\n") {
		if f := strings.Fields(line); len(f) >= 3 && f[0] == id && f[2] == "RUNNING" {
			pid, err := strconv.Atoi(f[1])
			if err != nil {
				t.Fatal(err)
			}
			return pid
		}
	}
	t.Fatalf("task %s not running", id)
	return 0
}

// fuseServerOf finds the fuse-overlayfs process whose command line names
// the container's upper directory.
func fuseServerOf(t *testing.T, e *env, id string) int {
	t.Helper()
	upper := e.upperdir("default", id)
	entries, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	for _, ent := range entries {
		pid, err := strconv.Atoi(ent.Name())
		if err != nil {
			continue
		}
		raw, err := os.ReadFile(filepath.Join("/proc", ent.Name(), "cmdline"))
		argv0, _, _ := strings.Cut(string(raw), "\x00")
		if err == nil && filepath.Base(argv0) == "fuse-overlayfs" && strings.Contains(string(raw), upper) {
			return pid
		}
	}
	t.Fatalf("no fuse-overlayfs process serves %s (upper %s)", id, upper)
	return 0
}

// parentCmdline returns the command line of pid's parent.
func parentCmdline(t *testing.T, pid int) string {
	t.Helper()
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	// pid (comm) state ppid ...: comm may hold spaces, so cut after ')'.
	f := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:]))
	raw, err := os.ReadFile("/proc/" + f[1] + "/cmdline")
	if err != nil {
		t.Fatal(err)
	}
	return "pid " + f[1] + ": " + strings.TrimSpace(strings.ReplaceAll(string(raw), "\x00", " "))
}

// procState returns the state letter of a process.
func procState(pid int) (string, error) {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "", err
	}
	f := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:]))
	return f[0], nil
}

// TestShippedUnitKillMode checks the shipped proxy unit's KillMode: mixed,
// so that a stop sends SIGTERM to the server alone. The fuse-overlayfs
// servers of running containers are children of the runc shims
// (TestRunningContainerSurvives), outside this unit.
func TestShippedUnitKillMode(t *testing.T) {
	repo, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(repo, "config", "containerd-fuse-overlayfs.service"))
	if err != nil {
		t.Fatal(err)
	}
	var section string
	var modes []string
	for _, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if strings.HasPrefix(line, "[") {
			section = line
		}
		if v, ok := strings.CutPrefix(line, "KillMode="); ok {
			modes = append(modes, section+" "+v)
		}
	}
	if len(modes) != 1 || modes[0] != "[Service] mixed" {
		t.Fatalf("KillMode settings in the shipped unit: %q, want exactly [Service] mixed", modes)
	}
}
