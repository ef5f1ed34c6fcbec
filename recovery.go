//go:build linux

package fuseoverlayfs

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/containerd/log"

	"github.com/fosnap/fuseoverlayfs/internal/layout"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// recoverRoot deals with what an interrupted run left in the root: probe
// directories, temporary create directories and directories the store no
// longer knows, and fuse-overlayfs mounts whose server is gone. Each finding
// is logged; none stops the snapshotter from opening.
func (o *snapshotter) recoverRoot(ctx context.Context) error {
	for _, m := range deadFUSEMounts() {
		if err := unix.Unmount(m, unix.MNT_DETACH); err != nil {
			log.G(ctx).WithError(err).WithField("mountpoint", m).Warn("cannot detach fuse-overlayfs mount whose server is gone")
			continue
		}
		deadMountsFound.WithValues("open").Inc()
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
		recoveredDirs.WithValues("probe").Inc()
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
		recoveredDirs.WithValues("orphan").Inc()
		log.G(ctx).WithField("path", dir).Info("removed snapshot directory unknown to the metadata store")
	}
	return nil
}

// deadFUSEMounts lists fuse-overlayfs mount points whose server has died:
// every access to them fails with ENOTCONN and nothing can bring them back,
// so they are reclaimed wherever they are.
func deadFUSEMounts() []string {
	mounts, err := mountinfo.GetMounts(mountinfo.FSTypeFilter(layout.FSType))
	if err != nil {
		return nil
	}
	var dead []string
	for _, m := range mounts {
		if isDisconnected(m.Mountpoint) {
			dead = append(dead, m.Mountpoint)
		}
	}
	return dead
}

// isDisconnected asks the filesystem at path for its statistics, which FUSE
// always forwards to the server (a stat may be answered from the kernel's
// attribute cache even after the server died). A hung server (stopped, not
// dead) must not hang the caller: after a second it gives up and reports the
// mount as alive.
func isDisconnected(path string) bool {
	done := make(chan error, 1)
	go func() {
		var st unix.Statfs_t
		done <- unix.Statfs(path, &st)
	}()
	select {
	case err := <-done:
		return errors.Is(err, unix.ENOTCONN)
	case <-time.After(time.Second):
		return false
	}
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
