package differ

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"

	"github.com/fosnap/fuseoverlayfs/internal/layout"
	"github.com/fosnap/fuseoverlayfs/internal/testutil"
	"github.com/fosnap/fuseoverlayfs/internal/testutil/tartest"
)

// TestApplyOnlyIntoActive: Apply writes only into active snapshots. Mounts
// naming a committed snapshot's layer (its bind, or an overlay with its
// upper and work directories), a view's layer, a layer directory no
// snapshot owns, or another directory of the root are refused as failed
// preconditions naming the directory and why, and nothing in the root
// changes; a differ without WithSnapshotKinds refuses even an active one.
// Applying to active snapshots, through their bind and overlay mounts,
// works, and Compare still reads a committed upper.
func TestApplyOnlyIntoActive(t *testing.T) {
	testutil.RequireRoot(t)
	e := newEnv(t)
	dif := e.differ()
	root := layout.Root(e.root)
	baseMounts := e.unpack(t, dif, "base", "", "", layerTar(t, base...))
	baseFS := baseMounts[0].Source
	id, ok := root.LayerID(baseFS)
	if !ok {
		t.Fatalf("base mount %v is not a layer bind", baseMounts)
	}
	view, err := e.sn.View(e.ctx, "empty-view", "")
	if err != nil {
		t.Fatal(err)
	}
	viewFS := layerIn(t, view)
	orphan := root.FS("99")
	if err := os.MkdirAll(orphan, 0o755); err != nil {
		t.Fatal(err)
	}
	active, err := e.sn.Prepare(e.ctx, "top-extract", "base")
	if err != nil {
		t.Fatal(err)
	}
	activeID, _ := root.LayerID(upperOf(t, active))

	rwBind := func(p string) []mount.Mount {
		return []mount.Mount{{Type: "bind", Source: p, Options: []string{"rw", "rbind"}}}
	}
	overlay := func(upper, work string) []mount.Mount {
		return []mount.Mount{layout.Overlay([]string{root.Empty()}, upper, work)}
	}
	desc, _ := e.blob(t, layerTar(t, tartest.File("planted", 0o644, "x"), tartest.File("etc/a", 0o644, "overwritten")))
	before := treeOf(t, root.Snapshots(), true)
	for _, tc := range []struct {
		name   string
		dif    *Differ
		mounts []mount.Mount
		want   string
	}{
		{"committed bind", dif, baseMounts, baseFS + ": snapshot " + id + " is Committed, not active"},
		{"committed overlay", dif, overlay(baseFS, root.Work(id)), baseFS + ": snapshot " + id + " is Committed, not active"},
		{"view bind", dif, rwBind(viewFS), viewFS + ": snapshot " + filepath.Base(filepath.Dir(viewFS)) + " is View, not active"},
		{"no snapshot", dif, rwBind(orphan), orphan + ": no snapshot of " + e.root + " has ID 99"},
		{"snapshot directory", dif, rwBind(root.Snapshot(id)), "bind source " + root.Snapshot(id) + " lies in the fuse-overlayfs snapshotter root"},
		{"dotdot", dif, rwBind(baseFS + "/../../" + id), "bind source " + baseFS + "/../../" + id + " lies in"},
		{"layer subdirectory", dif, rwBind(filepath.Join(baseFS, "etc")), "bind source " + filepath.Join(baseFS, "etc") + " lies in"},
		{"foreign workdir", dif, overlay(root.FS(activeID), t.TempDir()), "upperdir " + root.FS(activeID) + " lies in"},
		{"committed workdir", dif, overlay(t.TempDir(), root.Work(id)), "workdir " + root.Work(id) + " lies in"},
		{"differ without kinds", New(e.store, []string{e.root}), active, "cannot tell whether snapshot " + activeID + " is active"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := tc.dif.Apply(e.ctx, desc, tc.mounts)
			if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Apply to %v: %v, want a failed precondition containing %q", tc.mounts, err, tc.want)
			}
		})
	}
	if diff := treeDiff(before, treeOf(t, root.Snapshots(), true)); diff != "" {
		t.Fatalf("refused applies changed the root:\n%s", diff)
	}

	t.Run("active overlay", func(t *testing.T) {
		if _, err := dif.Apply(e.ctx, desc, active); err != nil {
			t.Fatal(err)
		}
		if got := readFile(t, filepath.Join(root.FS(activeID), "planted")); got != "x" {
			t.Errorf("planted in the active upper reads %q", got)
		}
		mustNotExist(t, filepath.Join(baseFS, "planted"))
	})
	t.Run("active bind", func(t *testing.T) {
		m, err := e.sn.Prepare(e.ctx, "solo-extract", "")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := dif.Apply(e.ctx, desc, m); err != nil {
			t.Fatal(err)
		}
		if got := readFile(t, filepath.Join(m[0].Source, "etc/a")); got != "overwritten" {
			t.Errorf("etc/a in the active bind reads %q", got)
		}
	})
	t.Run("compare reads a committed upper", func(t *testing.T) {
		if err := e.sn.Commit(e.ctx, "top", "top-extract"); err != nil {
			t.Fatal(err)
		}
		lower, err := e.sn.View(e.ctx, "base-view", "base")
		if err != nil {
			t.Fatal(err)
		}
		committed := treeOf(t, root.Snapshots(), true)
		got, err := dif.Compare(e.ctx, lower, active)
		if err != nil {
			t.Fatal(err)
		}
		if got.Size == 0 {
			t.Errorf("Compare of the committed upper: %v", got)
		}
		if diff := treeDiff(committed, treeOf(t, root.Snapshots(), true)); diff != "" {
			t.Errorf("Compare changed the root:\n%s", diff)
		}
	})
}

// layerIn is the layer a view without parent shows: a read-only bind of
// its own layer directory.
func layerIn(t *testing.T, mounts []mount.Mount) string {
	t.Helper()
	m, ok, err := layout.Parse(mounts[0])
	if err != nil || !ok || !m.Bind || m.RW {
		t.Fatalf("view mounts %v (%v): want a read-only bind", mounts, err)
	}
	return m.Source
}
