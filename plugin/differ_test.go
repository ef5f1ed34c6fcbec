//go:build linux

package plugin

import (
	"context"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/plugins"
	"github.com/containerd/errdefs"
	"github.com/containerd/plugin"
	"github.com/containerd/plugin/registry"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	fuseoverlayfs "github.com/fosnap/fuseoverlayfs"
	"github.com/fosnap/fuseoverlayfs/differ"
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

// TestDifferAsksSnapshotKinds: the differ built in containerd gets the
// loaded snapshotter's root and its snapshot kinds, and so refuses to write
// into a committed layer; without the snapshotter it gets neither.
func TestDifferAsksSnapshotKinds(t *testing.T) {
	testutil.RequireFUSE(t)
	if roots, opt := snapshotterRoot(newInitContext(t, &fuseoverlayfs.Config{})); roots != nil || opt != nil {
		t.Fatalf("without the snapshotter: roots %v, option set %v", roots, opt != nil)
	}
	ic := newInitContext(t, &fuseoverlayfs.Config{})
	p := plugin.Registration{Type: plugins.SnapshotPlugin, ID: ID, InitFn: initSnapshotter}.Init(ic)
	inst, err := p.Instance()
	if err != nil {
		t.Fatal(err)
	}
	sn := inst.(snapshots.Snapshotter)
	t.Cleanup(func() { _ = sn.Close() })
	set := plugin.NewPluginSet()
	if err := set.Add(p); err != nil {
		t.Fatal(err)
	}
	roots, opt := snapshotterRoot(plugin.NewContext(context.Background(), set, nil))
	if len(roots) != 1 || roots[0] != ic.Properties[plugins.PropertyRootDir] || opt == nil {
		t.Fatalf("roots %v (want %s), option set %v", roots, ic.Properties[plugins.PropertyRootDir], opt != nil)
	}
	ctx := namespaces.WithNamespace(context.Background(), "test")
	mounts, err := sn.Prepare(ctx, "a", "")
	if err != nil {
		t.Fatal(err)
	}
	if err := sn.Commit(ctx, "c", "a"); err != nil {
		t.Fatal(err)
	}
	// Refused before any content is read: no store needed.
	_, err = differ.NewApplier(nil, roots, opt).Apply(ctx, ocispec.Descriptor{}, mounts)
	if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "is Committed, not active") {
		t.Fatalf("Apply into the committed layer: %v, want a failed precondition", err)
	}
}
