//go:build !linux

package fuseoverlayfs

import (
	"runtime"

	"github.com/containerd/containerd/v2/core/snapshots"
)

var errNotLinux = errOnlyLinux(runtime.GOOS)

// Supported reports whether this host can run the snapshotter. On this
// system it cannot: the error says that only Linux is supported.
func Supported(root string) error {
	return errNotLinux
}

// Check runs the same checks as Supported. On this system it returns an
// empty HostInfo and the error that only Linux is supported.
func Check(root string) (HostInfo, error) {
	return HostInfo{}, errNotLinux
}

// NewSnapshotter opens a snapshotter rooted at root. On this system it
// returns the error that only Linux is supported.
func NewSnapshotter(root string, opts ...Opt) (snapshots.Snapshotter, error) {
	return nil, errNotLinux
}

// Diagnose runs the host checks one by one. On this system it reports one
// failure: only Linux is supported.
func Diagnose(root string) []Finding {
	return []Finding{{Check: "os", Status: StatusFail, Found: errNotLinux.Error(), Fix: "run the snapshotter on Linux"}}
}
