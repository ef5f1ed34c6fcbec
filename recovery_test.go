//go:build linux

package fuseoverlayfs

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"golang.org/x/sys/unix"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"
	"github.com/fosnap/fuseoverlayfs/monitor"
)

// twoLayers commits a base layer holding file "base" and prepares an active
// snapshot "work" on it, whose mounts are a real fuse-overlayfs overlay.
func twoLayers(t *testing.T, sn *snapshotter, ctx context.Context) []mount.Mount {
	t.Helper()
	if _, err := sn.Prepare(ctx, "base-a", ""); err != nil {
		t.Fatal(err)
	}
	id, _, _, _ := getInfo(ctx, sn, "base-a")
	if err := os.WriteFile(filepath.Join(sn.root.FS(id), "base"), []byte("base"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := sn.Commit(ctx, "base", "base-a"); err != nil {
		t.Fatal(err)
	}
	m, err := sn.Prepare(ctx, "work", "base")
	if err != nil {
		t.Fatal(err)
	}
	if m[0].Type != MountType {
		t.Fatalf("want a fuse-overlayfs mount, got %+v", m)
	}
	return m
}

// mountAndKill mounts m at target, checks it serves, then kills its
// fuse-overlayfs server with SIGKILL and waits until the mount is dead.
func mountAndKill(t *testing.T, m []mount.Mount, target, marker string) {
	t.Helper()
	if err := mount.All(m, target); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(target, "base")); err != nil || string(b) != "base" {
		t.Fatalf("mount does not serve: %q %v", b, err)
	}
	pids := testutil.FUSEProcesses(marker)
	if len(pids) != 1 {
		t.Fatalf("want one fuse-overlayfs server for %s, found %v", marker, pids)
	}
	if err := syscall.Kill(pids[0], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !monitor.Disconnected(target) {
		if time.Now().After(deadline) {
			t.Fatal("mount still answers after its server was killed")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestRecoveryAtOpen(t *testing.T) {
	testutil.RequireFUSE(t)
	tmp := t.TempDir()
	root := filepath.Join(tmp, "root")
	ctx := namespaces.WithNamespace(context.Background(), "test")
	s, err := NewSnapshotter(root)
	if err != nil {
		t.Fatal(err)
	}
	sn := s.(*snapshotter)
	m := twoLayers(t, sn, ctx)
	target := filepath.Join(tmp, "rootfs")
	if err := os.Mkdir(target, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(target, unix.MNT_DETACH) })
	mountAndKill(t, m, target, root)

	// What a crash leaves besides the dead mount.
	for _, d := range []string{
		filepath.Join(root, ".probe-123", "l1"),
		filepath.Join(sn.root.Snapshots(), "new-456", "fs"),
		filepath.Join(sn.root.Snapshots(), "999", "fs"),
	} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	if err := sn.Close(); err != nil {
		t.Fatal(err)
	}

	s, err = NewSnapshotter(root)
	if err != nil {
		t.Fatal(err)
	}
	sn = s.(*snapshotter)
	t.Cleanup(func() { _ = sn.Close() })
	if len(testutil.FUSEMounts(target)) != 0 {
		t.Fatalf("dead mount at %s still in mountinfo", target)
	}
	for _, gone := range []string{filepath.Join(root, ".probe-123"), filepath.Join(sn.root.Snapshots(), "new-456"), filepath.Join(sn.root.Snapshots(), "999")} {
		if _, err := os.Stat(gone); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s survived recovery: %v", gone, err)
		}
	}
	var keys []string
	if err := sn.Walk(ctx, func(_ context.Context, i snapshots.Info) error { keys = append(keys, i.Name); return nil }); err != nil {
		t.Fatal(err)
	}
	slices.Sort(keys)
	if !slices.Equal(keys, []string{"base", "work"}) {
		t.Fatalf("snapshots after recovery: %v", keys)
	}
	id, _, _, _ := getInfo(ctx, sn, "base")
	if b, err := os.ReadFile(filepath.Join(sn.root.FS(id), "base")); err != nil || string(b) != "base" {
		t.Fatalf("committed layer damaged: %q %v", b, err)
	}
	// The surviving active snapshot mounts again.
	m, err = sn.Mounts(ctx, "work")
	if err != nil {
		t.Fatal(err)
	}
	if err := mount.All(m, target); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(target, "base")); err != nil || string(b) != "base" {
		t.Fatalf("remount does not serve: %q %v", b, err)
	}
	if err := mount.UnmountAll(target, 0); err != nil {
		t.Fatal(err)
	}
	testutil.RequireNoLeftovers(t, root)
}

func TestRemoveWithDeadServer(t *testing.T) {
	testutil.RequireFUSE(t)
	for _, async := range []bool{false, true} {
		name := "sync"
		var opts []Opt
		if async {
			name, opts = "async", []Opt{AsynchronousRemove}
		}
		t.Run(name, func(t *testing.T) {
			sn, ctx := newTestSnapshotter(t, opts...)
			m := twoLayers(t, sn, ctx)
			id, _, _, _ := getInfo(ctx, sn, "work")
			// The worst case: the dead mount sits inside the directory to remove.
			target := filepath.Join(sn.root.Snapshot(id), "mnt")
			if err := os.Mkdir(target, 0o755); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = unix.Unmount(target, unix.MNT_DETACH) })
			mountAndKill(t, m, target, sn.root.FS(id))
			if err := sn.Remove(ctx, "work"); err != nil {
				t.Fatal(err)
			}
			if async {
				if err := sn.Cleanup(ctx); err != nil {
					t.Fatal(err)
				}
			}
			if _, err := os.Stat(sn.root.Snapshot(id)); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("directory of removed snapshot remains: %v", err)
			}
			testutil.RequireNoLeftovers(t, string(sn.root))
		})
	}
}
