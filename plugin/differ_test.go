//go:build linux

package plugin

import (
	"slices"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/plugins"
	"github.com/containerd/plugin"
	"github.com/containerd/plugin/registry"

	fuseoverlayfs "github.com/fosnap/fuseoverlayfs"
	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// TestDifferRegistered: the diff plugin is registered under the
// snapshotter's name and loads after the snapshotter it reads the root of.
func TestDifferRegistered(t *testing.T) {
	var found *plugin.Registration
	for _, r := range registry.Graph(func(*plugin.Registration) bool { return false }) {
		if r.Type == plugins.DiffPlugin && r.ID == ID {
			found = &r
		}
	}
	if found == nil {
		t.Fatal("no io.containerd.differ.v1 fuse-overlayfs registration")
	}
	for _, req := range []plugin.Type{plugins.MetadataPlugin, plugins.SnapshotPlugin} {
		if !slices.Contains(found.Requires, req) {
			t.Errorf("differ does not require %s: %v", req, found.Requires)
		}
	}
}

// TestInitAdvertisesRebase: containerd unpacks layers in parallel only for
// snapshotters advertising the rebase capability.
func TestInitAdvertisesRebase(t *testing.T) {
	testutil.RequireFUSE(t)
	ic := newInitContext(t, &fuseoverlayfs.Config{})
	sn, err := initSnapshotter(ic)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sn.(snapshots.Snapshotter).Close() })
	if !slices.Contains(ic.Meta.Capabilities, snapshots.RebaseCap) {
		t.Fatalf("capabilities %v lack %s", ic.Meta.Capabilities, snapshots.RebaseCap)
	}
}
