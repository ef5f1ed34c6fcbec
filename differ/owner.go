package differ

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"

	"github.com/fosnap/fuseoverlayfs/internal/layout"
)

// KindFunc tells the kind of the snapshot stored in the directory
// snapshots/<id> of a snapshotter root, from the snapshotter's metadata
// store; an ID no snapshot has is errdefs.ErrNotFound. The snapshotter that
// fuseoverlayfs.NewSnapshotter returns has one: its KindByID method.
type KindFunc func(ctx context.Context, id string) (snapshots.Kind, error)

// WithSnapshotKinds gives the differ the snapshot kinds of the snapshotter
// rooted at root. Apply writes a layer only into a directory that kinds
// says belongs to an active snapshot (from Prepare), the only kind
// containerd's unpacker applies to: a mount naming a committed snapshot's
// layer (shared by every image and container on it), a view's, or a
// directory no snapshot owns is refused. Without it, Apply refuses every
// mount of root, since nothing could tell it what it would write into.
func WithSnapshotKinds(root string, kinds KindFunc) Opt {
	return func(d *Differ) {
		if d.kinds == nil {
			d.kinds = map[layout.Root]KindFunc{}
		}
		d.kinds[layout.Root(filepath.Clean(root))] = kinds
	}
}

// checkActive refuses, with errdefs.ErrFailedPrecondition, to write into
// dir, the layer directory of snapshot id of root, unless that snapshot is
// active.
func (d *Differ) checkActive(ctx context.Context, root layout.Root, id, dir string) error {
	kindOf := d.kinds[root]
	if kindOf == nil {
		return fmt.Errorf("apply a layer into %s: this differ cannot tell whether snapshot %s is active, and writes only into active snapshots (build it with differ.WithSnapshotKinds): %w", dir, id, errdefs.ErrFailedPrecondition)
	}
	kind, err := kindOf(ctx, id)
	if errdefs.IsNotFound(err) {
		return fmt.Errorf("apply a layer into %s: no snapshot of %s has ID %s: a layer goes only into an active snapshot (from Prepare): %w", dir, root, id, errdefs.ErrFailedPrecondition)
	}
	if err != nil {
		return fmt.Errorf("apply a layer into %s: look up snapshot %s: %w", dir, id, err)
	}
	if kind != snapshots.KindActive {
		return fmt.Errorf("apply a layer into %s: snapshot %s is %s, not active: the diff API writes only into active snapshots (from Prepare), never into a committed layer or a view: %w", dir, id, kind, errdefs.ErrFailedPrecondition)
	}
	return nil
}

// rootHolding returns the root p lies in (or is), by name. A mount naming
// such a path that is not an active snapshot's layer must be refused, not
// declined: containerd's next differ would mount it and write there.
func (d *Differ) rootHolding(p string) (layout.Root, bool) {
	if !filepath.IsAbs(p) {
		return "", false
	}
	p = filepath.Clean(p)
	for _, r := range d.roots {
		if p == string(r) || strings.HasPrefix(p, string(r)+"/") {
			return r, true
		}
	}
	return "", false
}

// refuseInRoot is the error for a mount that writes into a path inside
// root that is not an active snapshot's layer directory.
func refuseInRoot(what, p string, root layout.Root) error {
	return fmt.Errorf("apply a layer: %s %s lies in the fuse-overlayfs snapshotter root %s but is not a snapshot's layer directory (%s/<id>/fs) with its work directory: only an active snapshot's mounts, as Prepare returns them, are written into: %w",
		what, p, root, root.Snapshots(), errdefs.ErrFailedPrecondition)
}
