//go:build linux

package testutil

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// KernelOverlay mounts a kernel overlay (empty lower, upper and work
// directories in a temporary directory) and returns its mount point, as a
// container's root filesystem would be. The cleanup unmounts it.
func KernelOverlay(t testing.TB) string {
	t.Helper()
	lower, upper, work, target := overlayDirs(t)
	opts := "lowerdir=" + lower + ",upperdir=" + upper + ",workdir=" + work
	if err := unix.Mount("overlay", target, "overlay", 0, opts); err != nil {
		Unavailable(t, "mount a kernel overlay: %v", err)
	}
	t.Cleanup(func() { unmountOrFail(t, target) })
	return target
}

// KernelOverlayOf mounts the layer directories lowers (newest first, at
// least two) read-only as a kernel overlay, as the overlayfs snapshotter
// mounts a view, and returns the mount point. The cleanup unmounts it.
func KernelOverlayOf(t testing.TB, lowers []string) string {
	t.Helper()
	target := t.TempDir()
	opts := "lowerdir=" + strings.Join(lowers, ":")
	if err := unix.Mount("overlay", target, "overlay", unix.MS_RDONLY, opts); err != nil {
		Unavailable(t, "mount a kernel overlay of %v: %v", lowers, err)
	}
	t.Cleanup(func() { unmountOrFail(t, target) })
	return target
}

// FuseOverlay runs fuse-overlayfs in the foreground over empty directories in
// a temporary directory, waits until its mount shows up, and returns the
// mount point. The cleanup unmounts it and waits for the server to exit,
// killing it by PID if it does not within 10 s.
func FuseOverlay(t testing.TB) string {
	t.Helper()
	lower, upper, work, target := overlayDirs(t)
	cmd := exec.Command("fuse-overlayfs", "-f", "-o", "lowerdir="+lower+",upperdir="+upper+",workdir="+work, target)
	p, err := StartProcess("fuse-overlayfs", cmd)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		unmountOrFail(t, target)
		if _, err := p.Wait(10 * time.Second); err != nil {
			t.Errorf("after its unmount: %v", err)
		}
	})
	err = p.WaitReady(10*time.Second, func() error {
		mounted, err := mountinfo.Mounted(target)
		if err != nil {
			return fmt.Errorf("look for the mount on %s: %w", target, err)
		}
		if !mounted {
			return fmt.Errorf("%s not mounted yet", target)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return target
}

func overlayDirs(t testing.TB) (lower, upper, work, target string) {
	t.Helper()
	base := t.TempDir()
	dirs := []string{filepath.Join(base, "lower"), filepath.Join(base, "upper"), filepath.Join(base, "work"), filepath.Join(base, "mnt")}
	for _, d := range dirs {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return dirs[0], dirs[1], dirs[2], dirs[3]
}

func unmountOrFail(t testing.TB, target string) {
	if mounted, err := mountinfo.Mounted(target); err == nil && !mounted {
		return
	}
	if err := unix.Unmount(target, 0); err != nil {
		_ = unix.Unmount(target, unix.MNT_DETACH)
		t.Errorf("unmount %s: %v", target, err)
	}
}

// ReadOnlyTmpfs mounts a small read-only tmpfs on a temporary directory
// and returns it; the cleanup unmounts it. WhileWritable writes into it.
func ReadOnlyTmpfs(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_RDONLY, "size=1m"); err != nil {
		Unavailable(t, "cannot mount a read-only tmpfs: %v", err)
	}
	t.Cleanup(func() { unmountOrFail(t, dir) })
	return dir
}

// WhileWritable remounts the tmpfs at dir (ReadOnlyTmpfs) read-write, runs
// f, and remounts it read-only.
func WhileWritable(t testing.TB, dir string, f func()) {
	t.Helper()
	if err := unix.Mount("", dir, "", unix.MS_REMOUNT, "size=1m"); err != nil {
		t.Fatal(err)
	}
	f()
	if err := unix.Mount("", dir, "", unix.MS_REMOUNT|unix.MS_RDONLY, "size=1m"); err != nil {
		t.Fatal(err)
	}
}
