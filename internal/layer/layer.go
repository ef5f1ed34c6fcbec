// Package layer writes image layers (OCI layer tars) straight into a
// fuse-overlayfs layer directory, in the form fuse-overlayfs 1.10 reads:
// whiteouts as 0/0 character devices (or `.wh.NAME` files where mknod is
// refused), opaque directories as an opaque xattr. It also exports an upper
// directory as a layer tar (Export, the differ's fast Compare) and finishes
// layers that were applied before their parents were known (parallel unpack).
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

	"github.com/fosnap/fuseoverlayfs/internal/layout"
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
	// Invisible, when not empty, says which markers the probe could not
	// make visible in any form on the filesystem (a fuse-overlayfs mount
	// refuses or hides them all): layers that delete files, or make a
	// directory opaque, cannot be stored there.
	Invisible string
}

// FallbackForms are the forms that work without any privilege.
var FallbackForms = Forms{DeviceWhiteouts: false, OpaqueXattr: OpaqueXattrUser}

var probed sync.Map // filesystem device -> Forms

// ProbeForms finds out, by writing each form in dir (which must exist and be
// on the layer's filesystem) and looking for it again, which whiteout and
// opaque forms this process can create there and still see: privilege is
// not enough on a nested host. A kernel overlay refuses the mknod of a 0/0
// device (EPERM) but keeps `.wh.` files; a fuse-overlayfs mount turns a 0/0
// device into its own whiteout and refuses `.wh.` names and the opaque
// xattrs. The answer is cached per filesystem.
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
	tmp, err := os.MkdirTemp(dir, layout.ProbePrefix)
	if err != nil {
		return f
	}
	defer func() { _ = os.RemoveAll(tmp) }()
	var invisible []string
	f.DeviceWhiteouts = deviceWhiteoutVisible(tmp + "/wh")
	if !f.DeviceWhiteouts && !fileWhiteoutVisible(tmp+"/"+whPrefix+"wh") {
		invisible = append(invisible, "whiteouts (neither a 0/0 character device nor a .wh. file)")
	}
	f.OpaqueXattr = ""
	for _, x := range []string{OpaqueXattrTrusted, OpaqueXattrUser} {
		if xattrVisible(tmp, x) {
			f.OpaqueXattr = x
			break
		}
	}
	if f.OpaqueXattr == "" {
		f.OpaqueXattr = FallbackForms.OpaqueXattr
		invisible = append(invisible, "opaque markers (neither "+OpaqueXattrTrusted+" nor "+OpaqueXattrUser+")")
	}
	f.Invisible = strings.Join(invisible, " and ")
	return f
}

// deviceWhiteoutVisible creates a 0/0 character device at p and reports
// whether it is then there as one.
func deviceWhiteoutVisible(p string) bool {
	if unix.Mknod(p, unix.S_IFCHR, 0) != nil {
		return false
	}
	var st unix.Stat_t
	return unix.Lstat(p, &st) == nil && isWhiteoutDev(&st)
}

// fileWhiteoutVisible creates an empty file at p and reports whether it is
// then there as a regular file.
func fileWhiteoutVisible(p string) bool {
	fd, err := unix.Open(p, unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return false
	}
	_ = unix.Close(fd)
	var st unix.Stat_t
	return unix.Lstat(p, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFREG
}

// xattrVisible sets xattr x to "y" on dir and reports whether it reads back.
func xattrVisible(dir, x string) bool {
	if unix.Lsetxattr(dir, x, []byte("y"), 0) != nil {
		return false
	}
	buf := make([]byte, 8)
	n, err := unix.Lgetxattr(dir, x, buf)
	return err == nil && string(buf[:n]) == "y"
}

// isWhiteoutDev reports whether st is a 0/0 character device.
func isWhiteoutDev(st *unix.Stat_t) bool {
	return st.Mode&unix.S_IFMT == unix.S_IFCHR && st.Rdev == 0
}

// isOpaque reports whether directory d is marked opaque in any of the forms
// fuse-overlayfs reads.
func isOpaque(d *dirFD) bool {
	// user.overlay.opaque: an unprivileged container can set it on a
	// directory of its upper layer, a commit keeps it, and fuse-overlayfs
	// honours it in a lower layer.
	for _, x := range []string{OpaqueXattrTrusted, OpaqueXattrUser, userOpaqueXattr} {
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
