package fuseoverlayfs

import (
	"context"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/log"

	"github.com/fosnap/fuseoverlayfs/internal/layout"
)

// MountType is the type of the overlay mounts this snapshotter returns;
// containerd mounts it with the mount.fuse3 helper, which runs fuse-overlayfs.
const MountType = layout.MountType

// buildMounts returns the mounts of snapshot s, in the shape of mounts() of
// containerd v2.4.2's plugins/snapshots/overlay/overlay.go (with
// fuse-overlayfs' mount type and ID-mapping options). Without ID mapping a snapshot
// with no parent, and a view of exactly one parent, are plain bind mounts;
// everything else, and anything ID-mapped (a bind mount cannot map IDs), is a
// fuse-overlayfs mount.
func buildMounts(l layout.Root, s storage.Snapshot, labels map[string]string, extra []string) ([]mount.Mount, error) {
	idOpts, err := idMapOptions(labels)
	if err != nil {
		return nil, err
	}
	active := s.Kind == snapshots.KindActive

	if len(idOpts) == 0 {
		switch {
		case len(s.ParentIDs) == 0:
			return []mount.Mount{layout.Bind(l.FS(s.ID), active)}, nil
		case !active && len(s.ParentIDs) == 1:
			return []mount.Mount{layout.Bind(l.FS(s.ParentIDs[0]), false)}, nil
		}
	}

	lowers := make([]string, 0, len(s.ParentIDs)+1)
	for _, id := range s.ParentIDs {
		lowers = append(lowers, l.FS(id))
	}
	if len(lowers) == 0 {
		if active {
			lowers = append(lowers, l.Empty())
		} else {
			// A view without parent shows its own (empty) layer, read-only.
			lowers = append(lowers, l.FS(s.ID))
		}
	}

	var upper, work string
	if active {
		upper, work = l.FS(s.ID), l.Work(s.ID)
	}
	return []mount.Mount{layout.Overlay(lowers, upper, work, append(idOpts, extra...)...)}, nil
}

// logMounts writes, at debug level, which mounts a call handed out: with
// the parent chain's length, it tells which steps of a build go through
// FUSE (docs/bench/build.md).
func logMounts(ctx context.Context, call, key string, s storage.Snapshot, m []mount.Mount) {
	if len(m) == 0 || !log.G(ctx).Logger.IsLevelEnabled(log.DebugLevel) {
		return
	}
	log.G(ctx).WithField("call", call).WithField("key", key).WithField("parents", len(s.ParentIDs)).
		WithField("type", m[0].Type).WithField("options", m[0].Options).Debug("snapshot mounts")
}
