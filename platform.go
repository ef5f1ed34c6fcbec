package fuseoverlayfs

import (
	"fmt"

	"github.com/containerd/errdefs"
)

// errOnlyLinux is the error NewSnapshotter returns on a system other than
// Linux (goos): the snapshotter needs Linux's FUSE and mount semantics.
func errOnlyLinux(goos string) error {
	return fmt.Errorf("fuse-overlayfs snapshotter: only Linux is supported (this is %s): %w", goos, errdefs.ErrNotImplemented)
}
