//go:build linux

package fuseoverlayfs

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"

	"github.com/fosnap/fuseoverlayfs/internal/layout"
)

// TestSnapshotterSuite runs containerd's snapshotter test suite, mounting
// through fuse-overlayfs for real.
func TestSnapshotterSuite(t *testing.T) {
	testutil.RequireFUSE(t)
	for _, tc := range []struct {
		name string
		opts []Opt
	}{
		{"sync", nil},
		{"async", []Opt{AsynchronousRemove}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			testsuite.SnapshotterSuite(t, "fuse-overlayfs", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
				sn, err := NewSnapshotter(root, tc.opts...)
				if err != nil {
					return nil, nil, err
				}
				return sn, sn.Close, nil
			})
		})
	}
	testutil.RequireNoLeftovers(t, "snapshot-suite-fuse-overlayfs-")
}

func newTestSnapshotter(t *testing.T, opts ...Opt) (*snapshotter, context.Context) {
	t.Helper()
	root := filepath.Join(t.TempDir(), "root")
	sn, err := NewSnapshotter(root, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := sn.Close(); err != nil {
			t.Error(err)
		}
	})
	return sn.(*snapshotter), namespaces.WithNamespace(context.Background(), "test")
}

func TestMountsByKind(t *testing.T) {
	l := layout.Root("/r")
	ids := func(n int) []string {
		var p []string
		for i := n; i >= 1; i-- {
			p = append(p, string(rune('0'+i)))
		}
		return p
	}
	uid := map[string]string{snapshots.LabelSnapshotUIDMapping: "0:1000:1,1:100000:65536"}
	for _, tc := range []struct {
		name    string
		kind    snapshots.Kind
		parents int
		labels  map[string]string
		extra   []string
		want    mount.Mount
	}{
		{"active, no parent", snapshots.KindActive, 0, nil, nil,
			mount.Mount{Type: "bind", Source: "/r/snapshots/9/fs", Options: []string{"rw", "rbind"}}},
		{"view, no parent", snapshots.KindView, 0, nil, nil,
			mount.Mount{Type: "bind", Source: "/r/snapshots/9/fs", Options: []string{"ro", "rbind"}}},
		{"view, one parent", snapshots.KindView, 1, nil, []string{"noacl"},
			mount.Mount{Type: "bind", Source: "/r/snapshots/1/fs", Options: []string{"ro", "rbind"}}},
		{"active, one parent", snapshots.KindActive, 1, nil, []string{"noacl"},
			mount.Mount{Type: MountType, Source: "overlay", Options: []string{"lowerdir=/r/snapshots/1/fs", "upperdir=/r/snapshots/9/fs", "workdir=/r/snapshots/9/work", "noacl"}}},
		{"active, three parents", snapshots.KindActive, 3, nil, nil,
			mount.Mount{Type: MountType, Source: "overlay", Options: []string{"lowerdir=/r/snapshots/3/fs:/r/snapshots/2/fs:/r/snapshots/1/fs", "upperdir=/r/snapshots/9/fs", "workdir=/r/snapshots/9/work"}}},
		{"view, two parents", snapshots.KindView, 2, nil, []string{"static_nlink"},
			mount.Mount{Type: MountType, Source: "overlay", Options: []string{"lowerdir=/r/snapshots/2/fs:/r/snapshots/1/fs", "static_nlink"}}},
		{"active, no parent, ID-mapped", snapshots.KindActive, 0, uid, nil,
			mount.Mount{Type: MountType, Source: "overlay", Options: []string{"lowerdir=/r/empty", "upperdir=/r/snapshots/9/fs", "workdir=/r/snapshots/9/work", "uidmapping=0:1000:1:1:100000:65536"}}},
		{"view, no parent, ID-mapped", snapshots.KindView, 0, uid, nil,
			mount.Mount{Type: MountType, Source: "overlay", Options: []string{"lowerdir=/r/snapshots/9/fs", "uidmapping=0:1000:1:1:100000:65536"}}},
		{"view, one parent, ID-mapped", snapshots.KindView, 1, map[string]string{
			snapshots.LabelSnapshotUIDMapping: "0:1000:10", snapshots.LabelSnapshotGIDMapping: "0:2000:10"}, nil,
			mount.Mount{Type: MountType, Source: "overlay", Options: []string{"lowerdir=/r/snapshots/1/fs", "uidmapping=0:1000:10", "gidmapping=0:2000:10"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := storage.Snapshot{Kind: tc.kind, ID: "9", ParentIDs: ids(tc.parents)}
			got, err := buildMounts(l, s, tc.labels, tc.extra)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != 1 || !reflect.DeepEqual(got[0], tc.want) {
				t.Fatalf("got %+v\nwant %+v", got, tc.want)
			}
		})
	}
}

func TestParseIDMapping(t *testing.T) {
	good := map[string]string{
		"0:1000:1":                  "0:1000:1",
		"0:100000:65536":            "0:100000:65536",
		"0:1000:1,1:100000:65536":   "0:1000:1:1:100000:65536",
		"4294967294:0:1":            "4294967294:0:1",
		"0:4294967294:1":            "0:4294967294:1",
		"0:0:4294967295":            "0:0:4294967295", // last IDs 4294967294
		"1:0:4294967294":            "1:0:4294967294",
		"4294967290:4294967290:5":   "4294967290:4294967290:5",
		"10:20:5,0:30:10,15:40:100": "10:20:5:0:30:10:15:40:100",
	}
	for in, want := range good {
		r, err := ParseIDMapping(in)
		if err != nil {
			t.Errorf("%q: unexpected error %v", in, err)
			continue
		}
		if got := fuseMapping(r); got != want {
			t.Errorf("%q: got %q, want %q", in, got, want)
		}
	}
	bad := []string{
		"", "0", "0:1", "0:1:2:3", "0:1:0", "a:1:1", "0:b:1", "0:1:c", "-1:0:1", "+1:0:1", " 0:1:1",
		"0:1:1,", ",0:1:1", "0:1:1,,2:3:1", "4294967296:0:1", "0:0:4294967296", "4294967295:0:2",
		"0:4294967295:2", "0:1000:10,5:2000:10", "0:1000:10,100:1005:1", "0x10:0:1", "0:1:1;2:3:1",
		"0:1:1\x00", "1e3:0:1", strings.Repeat("0:1:1,", 400) + "0:1:1",
	}
	for _, in := range bad {
		if _, err := ParseIDMapping(in); !errdefs.IsInvalidArgument(err) {
			t.Errorf("%q: got %v, want an invalid-argument error", in, err)
		}
	}
	// ID 4294967295 is (uid_t)-1, which the kernel refuses in a uid_map or
	// gid_map: no range may contain it, on either side.
	for in, rng := range map[string]string{
		"4294967295:0:1":         "4294967295:0:1",
		"0:4294967295:1":         "0:4294967295:1",
		"4294967291:0:5":         "4294967291:0:5",
		"0:4294967291:5":         "0:4294967291:5",
		"1:0:4294967295":         "1:0:4294967295",
		"0:1:4294967295":         "0:1:4294967295",
		"0:0:1,4294967295:1:1":   "4294967295:1:1",
		"0:0:10,10:4294967290:6": "10:4294967290:6",
	} {
		_, err := ParseIDMapping(in)
		if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), fmt.Sprintf("%q", rng)) || !strings.Contains(err.Error(), "4294967295") {
			t.Errorf("%q: got %v, want an invalid-argument error naming range %q and ID 4294967295", in, err, rng)
		}
	}
	// Through the labels, the error names the label.
	for _, label := range []string{snapshots.LabelSnapshotUIDMapping, snapshots.LabelSnapshotGIDMapping} {
		_, err := idMapOptions(map[string]string{label: "0:4294967295:1"})
		if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), label) || !strings.Contains(err.Error(), "0:4294967295:1") {
			t.Errorf("%s=0:4294967295:1: got %v, want an invalid-argument error naming the label and the range", label, err)
		}
	}
}

func FuzzParseIDMapping(f *testing.F) {
	for _, s := range []string{"0:1000:1", "0:1000:1,1:100000:65536", "0:1:0", "a", "4294967295:0:1", "4294967294:0:1", "0:0:4294967295"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		r, err := ParseIDMapping(in)
		if err != nil {
			if !errdefs.IsInvalidArgument(err) {
				t.Fatalf("%q: error of wrong class: %v", in, err)
			}
			return
		}
		out := fuseMapping(r)
		if strings.Trim(out, "0123456789:") != "" {
			t.Fatalf("%q: rendered %q has characters other than digits and ':'", in, out)
		}
		// What was accepted must survive a round trip unchanged.
		var label []string
		for _, x := range r {
			label = append(label, fmt.Sprintf("%d:%d:%d", x.ContainerID, x.HostID, x.Size))
		}
		again, err := ParseIDMapping(strings.Join(label, ","))
		if err != nil || !reflect.DeepEqual(again, r) {
			t.Fatalf("%q: second parse differs: %v %v", in, again, err)
		}
		// No accepted range reaches ID 4294967295 ((uid_t)-1) on either
		// side: the last ID, start+size-1, is at most 4294967294.
		for _, x := range r {
			if x.Size == 0 || uint64(x.ContainerID)+uint64(x.Size)-1 >= 1<<32-1 || uint64(x.HostID)+uint64(x.Size)-1 >= 1<<32-1 {
				t.Fatalf("%q: accepted bad range %+v", in, x)
			}
		}
	})
}

func TestValidateMountOptions(t *testing.T) {
	for _, ok := range []string{"noacl", "static_nlink", "squash_to_uid=1000", "max_idle_threads=4", "fsync=0", "a-b=c=d"} {
		if err := ValidateMountOptions([]string{ok}); err != nil {
			t.Errorf("%q refused: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "noacl,lowerdir=/etc", "=x", "upperdir=/tmp", "lowerdir=/", "workdir=/x", "uidmapping=0:0:1",
		"gidmapping=0:0:1", "a b", "a\nb", "a\x00b", "x/y=1", "..=1"} {
		err := ValidateMountOptions([]string{bad})
		if !errdefs.IsInvalidArgument(err) {
			t.Errorf("%q: got %v, want an invalid-argument error", bad, err)
		} else if !strings.Contains(err.Error(), "mount option") {
			t.Errorf("%q: error does not name the option: %v", bad, err)
		}
	}
	if _, err := NewSnapshotter(t.TempDir(), WithMountOptions([]string{"noacl,upperdir=/"})); !errdefs.IsInvalidArgument(err) {
		t.Errorf("NewSnapshotter took a bad mount option: %v", err)
	}
}

func TestBadLabelsRefused(t *testing.T) {
	sn, ctx := newTestSnapshotter(t)
	for _, label := range []string{snapshots.LabelSnapshotUIDMapping, snapshots.LabelSnapshotGIDMapping} {
		_, err := sn.Prepare(ctx, "bad", "", snapshots.WithLabels(map[string]string{label: "0:1000"}))
		if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), label) {
			t.Fatalf("Prepare with bad %s: got %v", label, err)
		}
		_, err = sn.View(ctx, "bad", "", snapshots.WithLabels(map[string]string{label: "x,uidmapping=0:0:1"}))
		if !errdefs.IsInvalidArgument(err) {
			t.Fatalf("View with bad %s: got %v", label, err)
		}
	}
	// Nothing of the refused snapshots stays behind.
	if _, err := sn.Stat(ctx, "bad"); !errdefs.IsNotFound(err) {
		t.Fatalf("refused snapshot exists: %v", err)
	}
	entries, err := os.ReadDir(sn.root.Snapshots())
	if err != nil || len(entries) != 0 {
		t.Fatalf("snapshots dir not empty after refused creates: %v %v", entries, err)
	}

	// Update refuses a bad label and keeps the good one.
	good := map[string]string{snapshots.LabelSnapshotUIDMapping: "0:1000:1"}
	if _, err := sn.Prepare(ctx, "ok", "", snapshots.WithLabels(good)); err != nil {
		t.Fatal(err)
	}
	_, err = sn.Update(ctx, snapshots.Info{Name: "ok", Labels: map[string]string{snapshots.LabelSnapshotUIDMapping: "0:0:0"}}, "labels."+snapshots.LabelSnapshotUIDMapping)
	if !errdefs.IsInvalidArgument(err) {
		t.Fatalf("Update with bad label: got %v", err)
	}
	info, err := sn.Stat(ctx, "ok")
	if err != nil || info.Labels[snapshots.LabelSnapshotUIDMapping] != "0:1000:1" {
		t.Fatalf("label lost after refused update: %v %v", info.Labels, err)
	}
}

func TestBadKeysRefused(t *testing.T) {
	sn, ctx := newTestSnapshotter(t)
	for _, key := range []string{"", "a\x00b", strings.Repeat("k", maxKeyLen+1)} {
		if _, err := sn.Prepare(ctx, key, ""); !errdefs.IsInvalidArgument(err) {
			t.Errorf("Prepare(%.20q): got %v", key, err)
		}
	}
	// Keys that look like paths are only names: they never reach the disk.
	for _, key := range []string{"../../etc", "/abs", "a/b/c"} {
		if _, err := sn.Prepare(ctx, key, ""); err != nil {
			t.Errorf("Prepare(%q): %v", key, err)
		}
	}
	if _, err := sn.Prepare(ctx, "child", "missing"); !errdefs.IsNotFound(err) {
		t.Errorf("Prepare on missing parent: got %v", err)
	}
	if _, err := sn.Prepare(ctx, "child", "a/b/c"); !errdefs.IsInvalidArgument(err) && !errdefs.IsFailedPrecondition(err) {
		t.Errorf("Prepare on active parent: got %v", err)
	}
}

func TestOwnerFollowsParent(t *testing.T) {
	testutil.RequireRoot(t)
	sn, ctx := newTestSnapshotter(t)
	if _, err := sn.Prepare(ctx, "base-active", ""); err != nil {
		t.Fatal(err)
	}
	id, _, _, err := getInfo(ctx, sn, "base-active")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Lchown(sn.root.FS(id), 1234, 5678); err != nil {
		t.Fatal(err)
	}
	if err := sn.Commit(ctx, "base", "base-active"); err != nil {
		t.Fatal(err)
	}
	if _, err := sn.Prepare(ctx, "child", "base"); err != nil {
		t.Fatal(err)
	}
	cid, _, _, err := getInfo(ctx, sn, "child")
	if err != nil {
		t.Fatal(err)
	}
	uid, gid := testutil.Owner(t, sn.root.FS(cid))
	if uid != 1234 || gid != 5678 {
		t.Fatalf("child root owned by %d:%d, want 1234:5678", uid, gid)
	}
}

func getInfo(ctx context.Context, sn *snapshotter, key string) (id string, info snapshots.Info, usage snapshots.Usage, err error) {
	err = sn.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		id, info, usage, err = storage.GetInfo(ctx, key)
		return err
	})
	return
}

func TestUsage(t *testing.T) {
	sn, ctx := newTestSnapshotter(t)
	if _, err := sn.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	id, _, _, _ := getInfo(ctx, sn, "a")
	if err := os.WriteFile(filepath.Join(sn.root.FS(id), "f"), make([]byte, 8192), 0o644); err != nil {
		t.Fatal(err)
	}
	u, err := sn.Usage(ctx, "a")
	if err != nil || u.Inodes != 2 || u.Size < 8192 {
		t.Fatalf("active usage %+v %v, want 2 inodes and at least 8192 bytes", u, err)
	}
	if err := sn.Commit(ctx, "c", "a"); err != nil {
		t.Fatal(err)
	}
	// Committed usage is what was recorded, not a new measurement.
	if err := os.WriteFile(filepath.Join(sn.root.FS(id), "g"), make([]byte, 8192), 0o644); err != nil {
		t.Fatal(err)
	}
	cu, err := sn.Usage(ctx, "c")
	if err != nil || cu != u {
		t.Fatalf("committed usage %+v %v, want %+v", cu, err, u)
	}
}

func TestAsyncRemoveThenCleanup(t *testing.T) {
	sn, ctx := newTestSnapshotter(t, AsynchronousRemove)
	for _, k := range []string{"keep", "drop1", "drop2"} {
		if _, err := sn.Prepare(ctx, k, ""); err != nil {
			t.Fatal(err)
		}
	}
	keepID, _, _, _ := getInfo(ctx, sn, "keep")
	drop1, _, _, _ := getInfo(ctx, sn, "drop1")
	drop2, _, _, _ := getInfo(ctx, sn, "drop2")
	if err := os.WriteFile(filepath.Join(sn.root.FS(keepID), "data"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	// What an interrupted create leaves.
	if err := os.MkdirAll(filepath.Join(sn.root.Snapshots(), "new-123", "fs"), 0o700); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"drop1", "drop2"} {
		if err := sn.Remove(ctx, k); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range []string{drop1, drop2} {
		if _, err := os.Stat(sn.root.Snapshot(id)); err != nil {
			t.Fatalf("async remove deleted %s before Cleanup: %v", id, err)
		}
	}
	if err := sn.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(sn.root.Snapshots())
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || entries[0].Name() != keepID {
		t.Fatalf("after Cleanup: %v, want only %s", entries, keepID)
	}
	if b, err := os.ReadFile(filepath.Join(sn.root.FS(keepID), "data")); err != nil || string(b) != "x" {
		t.Fatalf("kept snapshot lost its data: %q %v", b, err)
	}
	for _, f := range []string{"metadata.db", "empty"} {
		if _, err := os.Stat(filepath.Join(string(sn.root), f)); err != nil {
			t.Fatalf("Cleanup removed %s: %v", f, err)
		}
	}
}

func TestSyncRemove(t *testing.T) {
	sn, ctx := newTestSnapshotter(t)
	if _, err := sn.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	id, _, _, _ := getInfo(ctx, sn, "a")
	if err := sn.Remove(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(sn.root.Snapshot(id)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("sync remove left %s: %v", id, err)
	}
}

func TestRebaseOnCommit(t *testing.T) {
	sn, ctx := newTestSnapshotter(t)
	mustCommit := func(name, parent string) {
		t.Helper()
		if _, err := sn.Prepare(ctx, name+"-a", parent); err != nil {
			t.Fatal(err)
		}
		if err := sn.Commit(ctx, name, name+"-a"); err != nil {
			t.Fatal(err)
		}
	}
	mustCommit("base", "")
	mustCommit("other", "")
	if _, err := sn.Prepare(ctx, "layer-a", ""); err != nil {
		t.Fatal(err)
	}
	// A missing parent is refused and the active snapshot survives.
	if err := sn.Commit(ctx, "layer", "layer-a", snapshots.WithParent("missing")); !errdefs.IsNotFound(err) {
		t.Fatalf("commit onto missing parent: got %v", err)
	}
	if info, err := sn.Stat(ctx, "layer-a"); err != nil || info.Kind != snapshots.KindActive {
		t.Fatalf("active snapshot lost after refused commit: %+v %v", info, err)
	}
	// Found by TestModel: containerd's store would make these their own parent.
	for _, p := range []string{"layer", "layer-a"} {
		if err := sn.Commit(ctx, "layer", "layer-a", snapshots.WithParent(p)); !errdefs.IsInvalidArgument(err) {
			t.Fatalf("commit onto itself (%s): got %v", p, err)
		}
	}
	if err := sn.Commit(ctx, "layer", "layer-a", snapshots.WithParent("base")); err != nil {
		t.Fatal(err)
	}
	info, err := sn.Stat(ctx, "layer")
	if err != nil || info.Parent != "base" || info.Kind != snapshots.KindCommitted {
		t.Fatalf("rebased snapshot: %+v %v", info, err)
	}
	m, err := sn.Prepare(ctx, "top", "layer")
	if err != nil {
		t.Fatal(err)
	}
	baseID, _, _, _ := getInfo(ctx, sn, "base")
	layerID, _, _, _ := getInfo(ctx, sn, "layer")
	want := "lowerdir=" + sn.root.FS(layerID) + ":" + sn.root.FS(baseID)
	if m[0].Options[0] != want {
		t.Fatalf("mount after rebase: %v, want %s", m[0].Options, want)
	}
	// A snapshot prepared on a parent cannot be moved to another one.
	if _, err := sn.Prepare(ctx, "fixed-a", "base"); err != nil {
		t.Fatal(err)
	}
	if err := sn.Commit(ctx, "fixed", "fixed-a", snapshots.WithParent("other")); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("commit moving parent: got %v", err)
	}
	if info, err := sn.Stat(ctx, "fixed-a"); err != nil || info.Kind != snapshots.KindActive || info.Parent != "base" {
		t.Fatalf("active snapshot changed after refused commit: %+v %v", info, err)
	}
}

func TestRootModes(t *testing.T) {
	parent := t.TempDir()
	root := filepath.Join(parent, "root")
	if err := os.Mkdir(root, 0o777); err != nil {
		t.Fatal(err)
	}
	sn, err := NewSnapshotter(root)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sn.Close() })
	ctx := namespaces.WithNamespace(context.Background(), "test")
	if _, err := sn.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	s := sn.(*snapshotter)
	id, _, _, _ := getInfo(ctx, s, "a")
	for path, want := range map[string]os.FileMode{
		root: 0o700, s.root.Snapshots(): 0o700, s.root.Snapshot(id): 0o700, s.root.FS(id): 0o755,
	} {
		st, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != want {
			t.Errorf("%s has mode %v, want %v", path, st.Mode().Perm(), want)
		}
	}
}

func TestBadRoot(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := NewSnapshotter(file); err == nil {
		t.Fatal("a file was accepted as root")
	}
	for _, root := range []string{"", dir + "/a,b", dir + "/a:b"} {
		if _, err := NewSnapshotter(root); !errdefs.IsInvalidArgument(err) {
			t.Errorf("root %q: got %v", root, err)
		}
	}
}
