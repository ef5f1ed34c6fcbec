//go:build linux

// Package testutil holds helpers shared by the tests: prerequisites that must
// fail rather than skip in CI, and the checks that nothing is left behind.
package testutil

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/moby/sys/mountinfo"
)

// InCI reports whether the tests run in CI, where a missing prerequisite is a
// failure rather than a reason to skip.
func InCI() bool { return os.Getenv("CI") == "true" }

// Unavailable skips the test, or fails it in CI.
func Unavailable(t testing.TB, format string, args ...any) {
	t.Helper()
	if InCI() {
		t.Fatalf("CI=true and a prerequisite is missing: "+format, args...)
	}
	t.Skipf(format, args...)
}

// Seed returns the seed for a randomised test: the value of the environment
// variable env when set (to replay a run), else a new one. It logs which,
// with how to replay it.
func Seed(t testing.TB, env string) int64 {
	t.Helper()
	seed := time.Now().UnixNano()
	if s := os.Getenv(env); s != "" {
		var err error
		if seed, err = strconv.ParseInt(s, 10, 64); err != nil {
			t.Fatalf("%s=%q: %v", env, s, err)
		}
	}
	t.Logf("seed %d (%s=%d replays it)", seed, env, seed)
	return seed
}

// RequireRoot needs real root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Getuid() != 0 {
		Unavailable(t, "needs root (uid is %d)", os.Getuid())
	}
}

// RequireFUSE needs root, a usable /dev/fuse and fuse-overlayfs with its
// mount helper.
func RequireFUSE(t testing.TB) {
	t.Helper()
	RequireRoot(t)
	f, err := os.OpenFile("/dev/fuse", os.O_RDWR, 0)
	if err != nil {
		Unavailable(t, "needs /dev/fuse: %v", err)
		return
	}
	_ = f.Close()
	for _, prog := range []string{"fuse-overlayfs", "mount.fuse3"} {
		if _, err := lookPath(prog); err != nil {
			Unavailable(t, "needs %s on PATH (make deps installs it): %v", prog, err)
		}
	}
}

func lookPath(prog string) (string, error) {
	for _, dir := range filepath.SplitList(os.Getenv("PATH")) {
		p := filepath.Join(dir, prog)
		if st, err := os.Stat(p); err == nil && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", os.ErrNotExist
}

// Owner returns the uid and gid owning path (not following a symlink).
func Owner(t testing.TB, path string) (uint32, uint32) {
	t.Helper()
	st, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	sys := st.Sys().(*syscall.Stat_t)
	return sys.Uid, sys.Gid
}

// FUSEMounts lists the mount points in this mount namespace of
// fuse-overlayfs mounts whose mount point or options contain marker
// (moby/sys/mountinfo, the parser recovery.go uses).
func FUSEMounts(marker string) []string {
	infos, err := mountinfo.GetMounts(func(m *mountinfo.Info) (skip, stop bool) {
		line := m.Mountpoint + " " + m.Options + " " + m.VFSOptions + " " + m.Source
		return !strings.Contains(m.FSType+" "+m.Source, "fuse-overlayfs") || !strings.Contains(line, marker), false
	})
	if err != nil {
		return nil
	}
	var found []string
	for _, m := range infos {
		found = append(found, m.Mountpoint)
	}
	return found
}

// FUSEProcesses lists the PIDs of fuse-overlayfs processes whose command line
// contains marker.
func FUSEProcesses(marker string) []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmd, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || len(cmd) == 0 {
			continue
		}
		argv0 := string(cmd[:max(0, bytes.IndexByte(cmd, 0))])
		if filepath.Base(argv0) == "fuse-overlayfs" && bytes.Contains(cmd, []byte(marker)) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// RequireNoLeftovers fails the test if a fuse-overlayfs mount or process
// mentioning marker remains. A server exits a moment after its unmount, so
// it waits for that (up to 15 s) before judging.
func RequireNoLeftovers(t testing.TB, marker string) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		mounts, procs := FUSEMounts(marker), FUSEProcesses(marker)
		if len(mounts) == 0 && len(procs) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("left behind: fuse-overlayfs mounts %v, processes %v", mounts, procs)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
