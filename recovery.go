//go:build linux

package fuseoverlayfs

import (
	"context"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/containerd/log"

	"github.com/fosnap/fuseoverlayfs/monitor"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// recoverRoot deals with what an interrupted run left in the root: probe
// directories, temporary create directories and directories the store no
// longer knows, and fuse-overlayfs mounts whose server is gone. Each finding
// is logged; none stops the snapshotter from opening.
func (o *snapshotter) recoverRoot(ctx context.Context) error {
	for _, m := range monitor.DeadMounts() {
		if err := unix.Unmount(m, unix.MNT_DETACH); err != nil {
			log.G(ctx).WithError(err).WithField("mountpoint", m).Warn("cannot detach fuse-overlayfs mount whose server is gone")
			continue
		}
		monitor.DeadMountFound(monitor.FoundAtOpen)
		log.G(ctx).WithField("mountpoint", m).Info("detached fuse-overlayfs mount whose server is gone")
	}
	probes, err := filepath.Glob(o.root.Probes())
	if err != nil {
		return err
	}
	for _, p := range probes {
		if err := removeAll(p); err != nil {
			log.G(ctx).WithError(err).WithField("path", p).Warn("cannot remove leftover probe directory")
			continue
		}
		monitor.DirRecovered(monitor.RecoveredProbe)
		log.G(ctx).WithField("path", p).Info("removed leftover probe directory")
	}
	var orphans []string
	if err := o.ms.WithTransaction(ctx, true, func(ctx context.Context) (err error) {
		orphans, err = o.orphans(ctx)
		return err
	}); err != nil {
		return err
	}
	for _, dir := range orphans {
		if err := removeAll(dir); err != nil {
			log.G(ctx).WithError(err).WithField("path", dir).Warn("cannot remove snapshot directory unknown to the metadata store")
			continue
		}
		monitor.DirRecovered(monitor.RecoveredOrphan)
		log.G(ctx).WithField("path", dir).Info("removed snapshot directory unknown to the metadata store")
	}
	return nil
}

// removeAll removes dir. Should a mount inside it stop that (a FUSE mount
// whose server died gives ENOTCONN, a live one EBUSY), the mounts under dir
// are detached and the removal tried once more.
func removeAll(dir string) error {
	err := os.RemoveAll(dir)
	if err == nil {
		return nil
	}
	mounts, merr := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if merr != nil || len(mounts) == 0 {
		return err
	}
	// Deepest first, so no mount is detached from under another.
	sort.Slice(mounts, func(i, j int) bool { return len(mounts[i].Mountpoint) > len(mounts[j].Mountpoint) })
	for _, m := range mounts {
		if m.Mountpoint == dir || strings.HasPrefix(m.Mountpoint, dir+"/") {
			_ = unix.Unmount(m.Mountpoint, unix.MNT_DETACH)
		}
	}
	return os.RemoveAll(dir)
}
