package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/platforms"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// TestDiffAPIRefusesCommittedLayers: a real containerd's diff service,
// called with hand-made mounts naming a committed layer of the built-in
// snapshotter (its bind, or an overlay with its upper and work
// directories), answers FailedPrecondition from our differ instead of
// writing the layer there (nor going on to its walking applier), and
// every committed layer stays as it was; the same layer applies to a
// snapshot prepared for it.
func TestDiffAPIRefusesCommittedLayers(t *testing.T) {
	e := newEnv(t)
	ref := e.fx.refs[e.fx.features.Repo]
	e.ctr("images", "pull", "--plain-http", "--snapshotter", sn, ref)
	c, err := client.New(e.c.Address)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	ctx := namespaces.WithNamespace(e.ctx, "default")
	img, err := c.GetImage(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	manifest, err := images.Manifest(ctx, c.ContentStore(), img.Target(), platforms.Default())
	if err != nil {
		t.Fatal(err)
	}
	layer := manifest.Layers[len(manifest.Layers)-1]

	snapshots := filepath.Join(e.builtinRoot(), "snapshots")
	entries, err := os.ReadDir(snapshots)
	if err != nil || len(entries) == 0 {
		t.Fatalf("%s after the pull: %v, %v", snapshots, entries, err)
	}
	committed := filepath.Join(snapshots, entries[0].Name())
	before := dirTree(t, snapshots)
	for name, m := range map[string]mount.Mount{
		"bind":    {Type: "bind", Source: committed + "/fs", Options: []string{"rw", "rbind"}},
		"overlay": {Type: "fuse3.fuse-overlayfs", Source: "overlay", Options: []string{"lowerdir=" + e.builtinRoot() + "/empty", "upperdir=" + committed + "/fs", "workdir=" + committed + "/work"}},
	} {
		_, err := c.DiffService().Apply(ctx, layer, []mount.Mount{m})
		if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "is Committed, not active") {
			t.Errorf("%s of committed %s: %v, want a failed precondition saying it is committed", name, committed, err)
		}
	}
	for _, d := range testutil.TreeDiff(before, dirTree(t, snapshots)) {
		t.Errorf("under %s after the refused applies: %s", snapshots, d)
	}

	ctx, done, err := c.WithLease(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = done(ctx) }()
	s := c.SnapshotService(sn)
	mounts, err := s.Prepare(ctx, "diffapi-extract", "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.DiffService().Apply(ctx, layer, mounts); err != nil {
		t.Errorf("Apply to a prepared snapshot: %v", err)
	}
	if err := s.Remove(ctx, "diffapi-extract"); err != nil {
		t.Fatal(err)
	}
	e.ctr("images", "rm", "--sync", ref)
}

// dirTree describes every entry under root by type, mode, size and content.
func dirTree(t *testing.T, root string) map[string]string {
	t.Helper()
	out, err := testutil.Tree(root, testutil.TreeOpts{
		Fields: testutil.TreeType | testutil.TreePerm | testutil.TreeSize | testutil.TreeContent,
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}
