// Package layer writes image layers (OCI layer tars) straight into a
// fuse-overlayfs layer directory, in the form fuse-overlayfs 1.10 reads:
// whiteouts as 0/0 character devices (or `.wh.NAME` files where mknod is
// refused), opaque directories as an opaque xattr. It also finishes layers
// that were applied before their parents were known (parallel unpack).
package layer

import (
	"errors"
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

func probeForms(dir string) Forms {
	f := FallbackForms
	tmp, err := os.MkdirTemp(dir, ".probe-")
	if err != nil {
		return f
	}
	defer func() { _ = os.RemoveAll(tmp) }()
	dev := tmp + "/wh"
	if unix.Mknod(dev, unix.S_IFCHR, 0) == nil {
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

// isOpaque reports whether directory p (a real path) is marked opaque in any
// of the forms fuse-overlayfs reads.
func isOpaque(p string) bool {
	var b [4]byte
	for _, x := range []string{OpaqueXattrTrusted, OpaqueXattrUser} {
		if n, err := unix.Lgetxattr(p, x, b[:]); err == nil && n == 1 && b[0] == 'y' {
			return true
		}
	}
	var st unix.Stat_t
	return unix.Lstat(p+"/"+whOpaqueTar, &st) == nil
}

// lstat returns the stat of p, or ok=false if it does not exist.
func lstat(p string) (unix.Stat_t, bool, error) {
	var st unix.Stat_t
	err := unix.Lstat(p, &st)
	if err == nil {
		return st, true, nil
	}
	if errors.Is(err, unix.ENOENT) {
		return st, false, nil
	}
	return st, false, &os.PathError{Op: "lstat", Path: p, Err: err}
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

// mergedLookup finds rel (cleaned, no symlinks to follow) in the stack of
// layers, newest first, honouring whiteouts and opaque directories. It
// returns the index of the layer holding it and its stat.
func mergedLookup(layers []string, rel string) (int, unix.Stat_t, bool, error) {
	comps := splitRel(rel)
	if len(comps) == 0 {
		st, ok, err := lstat(layers[0])
		return 0, st, ok, err
	}
	for li, l := range layers {
		stop := false
		p := l
		missing := false
		for i, c := range comps {
			parent := p
			p = p + "/" + c
			st, ok, err := lstat(p)
			if err != nil {
				return 0, st, false, err
			}
			if !ok {
				if _, wh, _ := lstat(parent + "/" + whPrefix + c); wh {
					return 0, st, false, nil
				}
				missing = true
				break
			}
			if isWhiteoutDev(&st) {
				return 0, st, false, nil
			}
			if i == len(comps)-1 {
				return li, st, true, nil
			}
			if st.Mode&unix.S_IFMT != unix.S_IFDIR {
				// A non-directory hides whatever lower layers have below it.
				return 0, st, false, nil
			}
			if isOpaque(p) {
				stop = true
			}
		}
		if missing && stop {
			return 0, unix.Stat_t{}, false, nil
		}
	}
	return 0, unix.Stat_t{}, false, nil
}

// errno wraps a syscall error as a PathError.
func errno(op, p string, err error) error {
	if err == nil {
		return nil
	}
	var pe *os.PathError
	if errors.As(err, &pe) {
		return err
	}
	return &os.PathError{Op: op, Path: p, Err: err}
}
