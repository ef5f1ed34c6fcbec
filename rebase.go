//go:build linux

package fuseoverlayfs

import (
	"context"
	"fmt"
	"os"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/fosnap/fuseoverlayfs/internal/layer"
)

// finishUnpack completes, inside Commit's transaction, a layer that the
// fuse-overlayfs differ applied while the snapshot had no parent
// (containerd's parallel unpack prepares every layer without one and names
// the parent only at Commit). With the parent now known, hard links to files
// of lower layers are made by copying the file up, and directories the tar
// implied get the metadata of the lower ones; a layer that stays without
// parent loses the whiteouts that would hide nothing. It runs before the
// commit is stored and can run again, so a refused commit loses nothing.
// commitParent is the parent named at Commit (snapshots.WithParent), if any.
func (o *snapshotter) finishUnpack(ctx context.Context, id, key, name string, info snapshots.Info, commitParent string) error {
	stateFile := layer.StateFile(o.root.Snapshot(id))
	if !layer.HasState(stateFile) {
		return nil
	}
	parent := info.Parent
	switch {
	case parent == "":
		parent = commitParent
	case commitParent != "" && commitParent != parent:
		return fmt.Errorf("cannot change parent of active snapshot %q from %q to %q on commit: %w", key, parent, commitParent, errdefs.ErrInvalidArgument)
	}
	// Refuse what the commit would refuse before touching the layer.
	if _, _, _, err := storage.GetInfo(ctx, name); err == nil {
		return fmt.Errorf("committed snapshot %q: %w", name, errdefs.ErrAlreadyExists)
	} else if !errdefs.IsNotFound(err) {
		return err
	}
	var lowers []string
	for p := parent; p != ""; {
		pid, pinfo, _, err := storage.GetInfo(ctx, p)
		if err != nil {
			return fmt.Errorf("parent %q of %q: %w", p, key, err)
		}
		if pinfo.Kind != snapshots.KindCommitted {
			return fmt.Errorf("parent %q of %q is not committed: %w", p, key, errdefs.ErrInvalidArgument)
		}
		lowers = append(lowers, o.root.FS(pid))
		p = pinfo.Parent
	}
	if err := layer.Finish(ctx, o.root.FS(id), stateFile, lowers); err != nil {
		return fmt.Errorf("finish layer of %q on parent %q: %w", key, parent, err)
	}
	return nil
}

// dropUnpackState removes the state finishUnpack used, once the commit is stored.
func (o *snapshotter) dropUnpackState(ctx context.Context, id string) {
	stateFile := layer.StateFile(o.root.Snapshot(id))
	if err := os.Remove(stateFile); err != nil && !os.IsNotExist(err) {
		log.G(ctx).WithError(err).WithField("path", stateFile).Warn("failed to remove unpack state")
	}
}
