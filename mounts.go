package fuseoverlayfs

import (
	"path/filepath"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
)

// MountType is the type of the overlay mounts this snapshotter returns;
// containerd mounts it with the mount.fuse3 helper, which runs fuse-overlayfs.
const MountType = "fuse3.fuse-overlayfs"

// layout names the directories of a snapshotter root.
type layout string

func (l layout) snapshotsDir() string         { return filepath.Join(string(l), "snapshots") }
func (l layout) snapshotDir(id string) string { return filepath.Join(l.snapshotsDir(), id) }
func (l layout) fsPath(id string) string      { return filepath.Join(l.snapshotDir(id), "fs") }
func (l layout) workPath(id string) string    { return filepath.Join(l.snapshotDir(id), "work") }

// emptyDir is the lower directory of an ID-mapped active snapshot without a
// parent: fuse-overlayfs needs at least one lower directory.
func (l layout) emptyDir() string { return filepath.Join(string(l), "empty") }

// buildMounts returns the mounts of snapshot s. Without ID mapping a snapshot
// with no parent, and a view of exactly one parent, are plain bind mounts;
// everything else, and anything ID-mapped (a bind mount cannot map IDs), is a
// fuse-overlayfs mount.
func buildMounts(l layout, s storage.Snapshot, labels map[string]string, extra []string) ([]mount.Mount, error) {
	idOpts, err := idMapOptions(labels)
	if err != nil {
		return nil, err
	}
	active := s.Kind == snapshots.KindActive

	if len(idOpts) == 0 {
		switch {
		case len(s.ParentIDs) == 0:
			mode := "ro"
			if active {
				mode = "rw"
			}
			return []mount.Mount{{Type: "bind", Source: l.fsPath(s.ID), Options: []string{mode, "rbind"}}}, nil
		case !active && len(s.ParentIDs) == 1:
			return []mount.Mount{{Type: "bind", Source: l.fsPath(s.ParentIDs[0]), Options: []string{"ro", "rbind"}}}, nil
		}
	}

	lowers := make([]string, 0, len(s.ParentIDs)+1)
	for _, id := range s.ParentIDs {
		lowers = append(lowers, l.fsPath(id))
	}
	if len(lowers) == 0 {
		if active {
			lowers = append(lowers, l.emptyDir())
		} else {
			// A view without parent shows its own (empty) layer, read-only.
			lowers = append(lowers, l.fsPath(s.ID))
		}
	}

	options := []string{"lowerdir=" + strings.Join(lowers, ":")}
	if active {
		options = append(options, "upperdir="+l.fsPath(s.ID), "workdir="+l.workPath(s.ID))
	}
	options = append(options, idOpts...)
	options = append(options, extra...)
	return []mount.Mount{{Type: MountType, Source: "overlay", Options: options}}, nil
}
