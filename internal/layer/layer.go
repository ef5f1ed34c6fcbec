// Package layer writes image layers (OCI layer tars) straight into a
// fuse-overlayfs layer directory, in the form fuse-overlayfs 1.10 reads:
// whiteouts as 0/0 character devices (or `.wh.NAME` files where mknod is
// refused), opaque directories as an opaque xattr. It also finishes layers
// that were applied before their parents were known (parallel unpack).
//
// Layers are hostile. Every filesystem call goes through a handle rooted in
// the layer (fsat.go): names from the tar are resolved one component at a
// time, symlinks are followed only inside the layer stack, and no path made
// by joining the layer directory with a name reaches a path-based call.
package layer

import (
	"os"
	"path"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// Xattrs that mark a directory opaque. fuse-overlayfs reads the trusted one
// when it runs as real root and the user one otherwise (it reads both).
const (
	OpaqueXattrTrusted = "trusted.overlay.opaque"
	OpaqueXattrUser    = "user.fuseoverlayfs.opaque"
)

// Names of the OCI whiteout conventions.
const (
	whPrefix    = ".wh."
	whMetaPfx   = ".wh..wh."
	whOpaqueTar = ".wh..wh..opq"
)

// maxRel bounds a path in the layer: deeper trees than PATH_MAX allows
// would be unusable by every other tool (and containerd's own extraction
// refuses them).
const maxRel = unix.PathMax - 1

// Forms says how whiteouts and opaque directories are written.
type Forms struct {
	// DeviceWhiteouts writes a whiteout as a 0/0 character device (what
	// fuse-overlayfs itself writes); false writes an empty `.wh.NAME` file,
	// which fuse-overlayfs reads without privileges.
	DeviceWhiteouts bool
	// OpaqueXattr names the xattr set to "y" on opaque directories.
	OpaqueXattr string
}

// FallbackForms are the forms that work without any privilege.
var FallbackForms = Forms{DeviceWhiteouts: false, OpaqueXattr: OpaqueXattrUser}

var probed sync.Map // filesystem device -> Forms

// ProbeForms finds out, by trying in dir (which must exist and be on the
// layer's filesystem), whether this process may create 0/0 character devices
// and trusted.* xattrs there. The answer is cached per filesystem.
func ProbeForms(dir string) Forms {
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return probeForms(dir)
	}
	if f, ok := probed.Load(st.Dev); ok {
		return f.(Forms)
	}
	f := probeForms(dir)
	probed.Store(st.Dev, f)
	return f
}

// probeForms tries in a fresh directory of dir, a directory the
// snapshotter made (no name from a layer is involved).
func probeForms(dir string) Forms {
	f := FallbackForms
	tmp, err := os.MkdirTemp(dir, ".probe-")
	if err != nil {
		return f
	}
	defer func() { _ = os.RemoveAll(tmp) }()
	if unix.Mknod(tmp+"/wh", unix.S_IFCHR, 0) == nil {
		f.DeviceWhiteouts = true
	}
	if unix.Lsetxattr(tmp, OpaqueXattrTrusted, []byte("y"), 0) == nil {
		f.OpaqueXattr = OpaqueXattrTrusted
	}
	return f
}

// isWhiteoutDev reports whether st is a 0/0 character device.
func isWhiteoutDev(st *unix.Stat_t) bool {
	return st.Mode&unix.S_IFMT == unix.S_IFCHR && st.Rdev == 0
}

// isOpaque reports whether directory d is marked opaque in any of the forms
// fuse-overlayfs reads.
func isOpaque(d *dirFD) bool {
	for _, x := range []string{OpaqueXattrTrusted, OpaqueXattrUser} {
		if v, err := d.getXattrSelf(x); err == nil && string(v) == "y" {
			return true
		}
	}
	return d.exists(whOpaqueTar)
}

// cleanRel turns a tar name into a path relative to the layer root that
// cannot leave it: "" is the root itself.
func cleanRel(name string) string {
	return strings.TrimPrefix(path.Clean("/"+name), "/")
}

func join(dir, name string) string {
	if dir == "" {
		return name
	}
	return dir + "/" + name
}

func splitRel(rel string) []string {
	if rel == "" {
		return nil
	}
	return strings.Split(rel, "/")
}

// splitDir splits a cleaned relative path into its directory and base.
func splitDir(rel string) (string, string) {
	i := strings.LastIndexByte(rel, '/')
	if i < 0 {
		return "", rel
	}
	return rel[:i], rel[i+1:]
}

// under reports whether p is dir or lies below it.
func under(p, dir string) bool {
	return dir == "" || p == dir || strings.HasPrefix(p, dir+"/")
}
