//go:build linux

package fuseoverlayfs

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"

	"github.com/fosnap/fuseoverlayfs/internal/layout"
)

// FuzzMountOptions checks that whatever extra options and ID-mapping labels
// get through validation, the option string handed to fuse-overlayfs splits
// back into exactly the options the snapshotter meant: one lowerdir, upperdir
// and workdir each, pointing where they should.
func FuzzMountOptions(f *testing.F) {
	f.Add("noacl", "0:1000:1", "0:1000:1")
	f.Add("noacl,upperdir=/etc", "0:1000:1,1:2000:3", "")
	f.Add("squash_to_uid=0", "0:1000:1,uidmapping=0:0:1", "x")
	f.Add("=lowerdir", "", "0:0:1")
	f.Add("uidmapping=0:0:65536,upperdir=/elsewhere/fs,workdir=/elsewhere/work", "0:0:65536", "")
	f.Add("noacl\nnoacl", "", "")
	f.Add("static_nlink\nplugins=/tmp/p.so", "", "")
	f.Fuzz(func(t *testing.T, extra, uidmap, gidmap string) {
		opts := strings.Split(extra, "\n")
		labels := map[string]string{}
		if uidmap != "" {
			labels[snapshots.LabelSnapshotUIDMapping] = uidmap
		}
		if gidmap != "" {
			labels[snapshots.LabelSnapshotGIDMapping] = gidmap
		}
		if err := ValidateMountOptions(opts); err != nil {
			if !errdefs.IsInvalidArgument(err) {
				t.Fatalf("wrong error class: %v", err)
			}
			return
		}
		s := storage.Snapshot{Kind: snapshots.KindActive, ID: "7", ParentIDs: []string{"3", "2"}}
		m, err := buildMounts(layout.Root("/root"), s, labels, opts)
		if err != nil {
			if !errdefs.IsInvalidArgument(err) {
				t.Fatalf("wrong error class: %v", err)
			}
			return
		}
		// The differ reads back, and accepts, whatever the snapshotter builds.
		if _, ok, err := layout.Parse(m[0]); !ok || err != nil {
			t.Fatalf("own mount %q refused: %v, %v", m[0].Options, ok, err)
		}
		joined := strings.Join(m[0].Options, ",")
		got := map[string][]string{}
		for _, o := range strings.Split(joined, ",") {
			k, v, _ := strings.Cut(o, "=")
			got[k] = append(got[k], v)
		}
		want := map[string]string{
			"lowerdir": "/root/snapshots/3/fs:/root/snapshots/2/fs",
			"upperdir": "/root/snapshots/7/fs",
			"workdir":  "/root/snapshots/7/work",
		}
		for k, v := range want {
			if len(got[k]) != 1 || got[k][0] != v {
				t.Fatalf("option %s is %q in %q", k, got[k], joined)
			}
		}
		for _, k := range []string{"uidmapping", "gidmapping"} {
			if len(got[k]) > 1 {
				t.Fatalf("%s given %d times in %q", k, len(got[k]), joined)
			}
			for _, v := range got[k] {
				if strings.Trim(v, "0123456789:") != "" {
					t.Fatalf("%s=%q carries more than digits and ':'", k, v)
				}
			}
		}
	})
}

func TestHostileOperations(t *testing.T) {
	sn, ctx := newTestSnapshotter(t)
	if _, err := sn.Prepare(ctx, "base-a", ""); err != nil {
		t.Fatal(err)
	}
	if err := sn.Commit(ctx, "base", "base-a"); err != nil {
		t.Fatal(err)
	}
	// Committing twice: the key is gone after the first.
	if err := sn.Commit(ctx, "base2", "base-a"); !errdefs.IsNotFound(err) {
		t.Fatalf("second commit: got %v", err)
	}
	if _, err := sn.Prepare(ctx, "child", "base"); err != nil {
		t.Fatal(err)
	}
	// Committing onto an existing name keeps both.
	if _, err := sn.Prepare(ctx, "other", ""); err != nil {
		t.Fatal(err)
	}
	if err := sn.Commit(ctx, "base", "other"); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("commit onto existing name: got %v", err)
	}
	if info, err := sn.Stat(ctx, "other"); err != nil || info.Kind != snapshots.KindActive {
		t.Fatalf("active snapshot lost: %+v %v", info, err)
	}
	// Removing a parent with children is refused and both stay.
	if err := sn.Remove(ctx, "base"); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("remove parent with child: got %v", err)
	}
	for _, k := range []string{"base", "child"} {
		if _, err := sn.Stat(ctx, k); err != nil {
			t.Fatalf("%s lost: %v", k, err)
		}
	}
	// An active or view parent, a committed snapshot's mounts.
	if _, err := sn.Prepare(ctx, "x", "child"); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("prepare on active parent: got %v", err)
	}
	if _, err := sn.Mounts(ctx, "base"); !errdefs.IsFailedPrecondition(err) && !errdefs.IsInvalidArgument(err) && !errdefs.IsNotFound(err) {
		t.Fatalf("mounts of committed snapshot: got %v", err)
	}
	if err := sn.Commit(ctx, "", "child"); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("commit with empty name: got %v", err)
	}
	if err := sn.Commit(ctx, "a\x00b", "child"); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("commit with NUL in name: got %v", err)
	}
	if err := sn.Remove(ctx, "missing"); !errdefs.IsNotFound(err) {
		t.Fatalf("remove missing: got %v", err)
	}
}

// TestRootOnReadOnlyFilesystem: a root that cannot be created, or exists
// on a read-only filesystem, is refused at open.
func TestRootOnReadOnlyFilesystem(t *testing.T) {
	testutil.RequireRoot(t)
	dir := testutil.ReadOnlyTmpfs(t)
	root := filepath.Join(dir, "root")
	if _, err := NewSnapshotter(root); !errors.Is(err, unix.EROFS) {
		t.Fatalf("root on a read-only filesystem: %v, want EROFS", err)
	}
	testutil.WhileWritable(t, dir, func() {
		if err := os.Mkdir(root, 0o700); err != nil {
			t.Fatal(err)
		}
	})
	if _, err := NewSnapshotter(root); err == nil {
		t.Fatal("NewSnapshotter accepted a read-only root")
	}
}
