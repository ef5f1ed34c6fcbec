//go:build linux

package fuseoverlayfs

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/fosnap/fuseoverlayfs/internal/layer"
	"github.com/fosnap/fuseoverlayfs/internal/testutil"
	"github.com/fosnap/fuseoverlayfs/internal/testutil/tartest"
)

// tdir is a directory owned by uid:uid.
func tdir(name string, mode int64, uid int) tartest.Entry {
	e := tartest.Dir(name, mode)
	e.UID, e.GID = uid, uid
	return e
}

// applyDetached applies a layer into the active snapshot key as the
// fuse-overlayfs differ does for a snapshot prepared without parent.
func applyDetached(t *testing.T, ctx context.Context, sn *snapshotter, key string, r *bytes.Reader) string {
	t.Helper()
	id, _, _, err := getInfo(ctx, sn, key)
	if err != nil {
		t.Fatal(err)
	}
	if err := layer.Apply(ctx, sn.root.FS(id), r, layer.Options{Detached: true, StateFile: layer.StateFile(sn.root.Snapshot(id))}); err != nil {
		t.Fatal(err)
	}
	return id
}

// TestRebaseFinishesDetachedLayer: a layer applied before its parent was
// known (parallel unpack) is completed at Commit with WithParent: hard links
// to the parent's files and directories the tar only implied. A commit
// refused for a missing parent or a taken name changes nothing.
func TestRebaseFinishesDetachedLayer(t *testing.T) {
	testutil.RequireFUSE(t)
	t.Cleanup(func() { testutil.RequireNoLeftovers(t, "TestRebaseFinishesDetachedLayer") })
	sn, ctx := newTestSnapshotter(t)
	if _, err := sn.Prepare(ctx, "base-a", ""); err != nil {
		t.Fatal(err)
	}
	applyDetached(t, ctx, sn, "base-a", tartest.Layer{tdir("etc", 0o755, 0), tartest.File("etc/a", 0o644, "content"), tdir("lib", 0o700, 3), tartest.File("gone", 0o644, "g"), tartest.File(".wh.nothing", 0o644, "")}.Reader())
	if err := sn.Commit(ctx, "base", "base-a"); err != nil {
		t.Fatal(err)
	}
	baseID, _, _, _ := getInfo(ctx, sn, "base")
	if _, err := os.Lstat(filepath.Join(sn.root.FS(baseID), "nothing")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a base layer keeps no whiteouts: %v", err)
	}

	if _, err := sn.Prepare(ctx, "l-a", ""); err != nil {
		t.Fatal(err)
	}
	id := applyDetached(t, ctx, sn, "l-a", tartest.Layer{tartest.Hardlink("etc/a2", "etc/a"), tartest.File("lib/x", 0o644, "x"), tartest.Whiteout("gone")}.Reader())
	state := layer.StateFile(sn.root.Snapshot(id))
	if _, err := os.Stat(state); err != nil {
		t.Fatalf("detached apply left no state: %v", err)
	}
	if err := sn.Commit(ctx, "l", "l-a", snapshots.WithParent("missing")); !errdefs.IsNotFound(err) {
		t.Fatalf("commit onto missing parent: %v", err)
	}
	if err := sn.Commit(ctx, "base", "l-a", snapshots.WithParent("base")); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("commit onto a taken name: %v", err)
	}
	if info, err := sn.Stat(ctx, "l-a"); err != nil || info.Kind != snapshots.KindActive {
		t.Fatalf("active snapshot lost: %+v %v", info, err)
	}
	if _, err := os.Stat(state); err != nil {
		t.Fatalf("refused commit lost the state: %v", err)
	}
	if err := sn.Commit(ctx, "l", "l-a", snapshots.WithParent("base")); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(state); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("state left after commit: %v", err)
	}
	fsDir := sn.root.FS(id)
	var a, a2 unix.Stat_t
	if err := unix.Lstat(filepath.Join(fsDir, "etc/a"), &a); err != nil {
		t.Fatalf("link target not copied up: %v", err)
	}
	if err := unix.Lstat(filepath.Join(fsDir, "etc/a2"), &a2); err != nil || a.Ino != a2.Ino {
		t.Fatalf("etc/a2 not a hard link of etc/a: %v", err)
	}
	var lib unix.Stat_t
	if err := unix.Lstat(filepath.Join(fsDir, "lib"), &lib); err != nil || lib.Mode&0o7777 != 0o700 || lib.Uid != 3 {
		t.Errorf("implied lib should have the parent's metadata, mode %o uid %d: %v", lib.Mode&0o7777, lib.Uid, err)
	}

	// Through a real mount of a view.
	mounts, err := sn.View(ctx, "v", "l")
	if err != nil {
		t.Fatal(err)
	}
	target := t.TempDir()
	if err := mount.All(mounts, target); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := mount.UnmountAll(target, 0); err != nil {
			t.Error(err)
		}
	}()
	if b, err := os.ReadFile(filepath.Join(target, "etc/a2")); err != nil || string(b) != "content" {
		t.Errorf("etc/a2 through the mount: %q %v", b, err)
	}
	if _, err := os.Lstat(filepath.Join(target, "gone")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("gone should be whited out: %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(target, "lib/x")); err != nil || string(b) != "x" {
		t.Errorf("lib/x through the mount: %q %v", b, err)
	}
}
