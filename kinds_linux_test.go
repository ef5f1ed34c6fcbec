package fuseoverlayfs

import (
	"path/filepath"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
)

// TestKindByID: the kind of each snapshot by the ID its directory bears;
// an unknown ID, also in a store that never held a snapshot, is not found.
func TestKindByID(t *testing.T) {
	sn, ctx := newTestSnapshotter(t)
	if _, err := sn.KindByID(ctx, "1"); !errdefs.IsNotFound(err) {
		t.Fatalf("empty store: %v, want not found", err)
	}
	// Each is a bind of its own layer, snapshots/<id>/fs.
	idOf := func(m []mount.Mount) string { return filepath.Base(filepath.Dir(m[0].Source)) }
	prepare := func(key, parent string) string {
		t.Helper()
		m, err := sn.Prepare(ctx, key, parent)
		if err != nil {
			t.Fatal(err)
		}
		return idOf(m)
	}
	base := prepare("base-extract", "")
	if err := sn.Commit(ctx, "base", "base-extract"); err != nil {
		t.Fatal(err)
	}
	active := prepare("active", "")
	vm, err := sn.View(ctx, "view", "")
	if err != nil {
		t.Fatal(err)
	}
	view := idOf(vm)
	for id, want := range map[string]snapshots.Kind{base: snapshots.KindCommitted, active: snapshots.KindActive, view: snapshots.KindView} {
		if got, err := sn.KindByID(ctx, id); err != nil || got != want {
			t.Errorf("KindByID(%s) = %v, %v; want %v", id, got, err, want)
		}
	}
	for _, id := range []string{"99", "0" + base, "", "new-1"} {
		if got, err := sn.KindByID(ctx, id); !errdefs.IsNotFound(err) {
			t.Errorf("KindByID(%q) = %v, %v; want not found", id, got, err)
		}
	}
}
