//go:build !linux

package fuseoverlayfs

import (
	"runtime"

	"github.com/containerd/containerd/v2/core/snapshots"
)

// NewSnapshotter opens a snapshotter rooted at root. On this system it
// returns an error of class errdefs.ErrNotImplemented: only Linux is
// supported.
func NewSnapshotter(root string, opts ...Opt) (snapshots.Snapshotter, error) {
	return nil, errOnlyLinux(runtime.GOOS)
}
