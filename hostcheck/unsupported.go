//go:build !linux

package hostcheck

import (
	"fmt"
	"runtime"

	"github.com/containerd/errdefs"
)

// table has one check on systems other than Linux: the snapshotter needs
// Linux's FUSE and mount semantics.
var table = []check{{name: "os", atLoad: true, run: onlyLinux}}

func onlyLinux(*state) result {
	r := fail(nil, fmt.Sprintf("only Linux is supported (this is %s)", runtime.GOOS), "run the snapshotter on Linux")
	r.class = errdefs.ErrNotImplemented
	return r
}

func prepareRoot(string) {}
