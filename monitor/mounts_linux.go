//go:build linux

package monitor

import (
	"errors"
	"time"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/fosnap/fuseoverlayfs/internal/layout"
)

// DeadMounts lists the fuse-overlayfs mount points of this mount namespace
// whose server has died: every access to them fails with ENOTCONN and
// nothing can bring them back.
func DeadMounts() []string {
	mounts, err := mountinfo.GetMounts(mountinfo.FSTypeFilter(layout.FSType))
	if err != nil {
		return nil
	}
	var dead []string
	for _, m := range mounts {
		if Disconnected(m.Mountpoint) {
			dead = append(dead, m.Mountpoint)
		}
	}
	return dead
}

// Disconnected asks the filesystem at path for its statistics, which FUSE
// always forwards to the server (a stat may be answered from the kernel's
// attribute cache even after the server died). A hung server (stopped, not
// dead) must not hang the caller: after a second it gives up and reports the
// mount as connected.
func Disconnected(path string) bool {
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

func isMounted(mp string) bool {
	mounts, err := mountinfo.GetMounts(mountinfo.SingleEntryFilter(mp))
	return err == nil && len(mounts) > 0 && mounts[0].FSType == layout.FSType
}

// countMounted counts the points that the mount table lists as
// fuse-overlayfs mounts, reading it once.
func countMounted(points map[string]bool) int {
	if len(points) == 0 {
		return 0
	}
	mounts, err := mountinfo.GetMounts(mountinfo.FSTypeFilter(layout.FSType))
	if err != nil {
		return 0
	}
	seen := map[string]bool{}
	for _, m := range mounts {
		if points[m.Mountpoint] {
			seen[m.Mountpoint] = true
		}
	}
	return len(seen)
}
