package fuseoverlayfs

import (
	"errors"
	"fmt"

	"github.com/containerd/errdefs"
)

// HostInfo describes what the host checks found.
type HostInfo struct {
	// FuseOverlayfs is the path of the fuse-overlayfs program on PATH.
	FuseOverlayfs string
	// Version is what fuse-overlayfs reports as its version, e.g. "1.10".
	Version string
	// MountHelper is the path of the mount.fuse3 helper on PATH.
	MountHelper string
	// OpenFiles is the open-files limit (RLIMIT_NOFILE) the probe's
	// fuse-overlayfs server ran with; every server the snapshotter starts
	// gets the same. Check logs a warning when it is under 65536. 0 when it
	// could not be read.
	OpenFiles uint64
}

// ErrUnsupported is wrapped by every error the host checks return. Those
// errors are also of class errdefs.ErrFailedPrecondition (the host must be
// changed, by installing or fixing what the message names, before the
// snapshotter can run) and wrap what failed, so callers can match e.g.
// exec.ErrNotFound or fs.ErrPermission. On systems other than Linux the
// error is of class errdefs.ErrNotImplemented instead.
var ErrUnsupported = errors.New("fuse-overlayfs snapshotter cannot run on this host")

// errOnlyLinux is the error Supported, Check and NewSnapshotter return on a
// system other than Linux (goos): the snapshotter needs Linux's FUSE and
// mount semantics.
func errOnlyLinux(goos string) error {
	return fmt.Errorf("%w: only Linux is supported (this is %s): %w", ErrUnsupported, goos, errdefs.ErrNotImplemented)
}
