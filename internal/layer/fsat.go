package layer

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"unsafe"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// dirFD is an open directory of a layer. Every filesystem call of this
// package goes through one: the names its methods take are single path
// components (checked), and the calls never follow a symlink in that
// component, so no call can leave the directory by a symlink or "..". A
// dirFD is reached from the layer's root only by opening one component at
// a time with O_NOFOLLOW, which works on every kernel (no openat2 needed).
type dirFD struct {
	fd  int
	rel string // its path in the layer, for messages and records
}

const (
	dirFlags  = unix.O_RDONLY | unix.O_DIRECTORY | unix.O_NOFOLLOW | unix.O_CLOEXEC
	pathFlags = unix.O_PATH | unix.O_NOFOLLOW | unix.O_CLOEXEC
)

// openLayerDir opens a layer directory named by the snapshotter (a path it
// built itself, never one from a layer).
func openLayerDir(p string) (*dirFD, error) {
	fd, err := unix.Open(p, dirFlags, 0)
	if err != nil {
		if errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ELOOP) {
			return nil, fmt.Errorf("layer directory %s is not a directory: %w", p, errdefs.ErrInvalidArgument)
		}
		return nil, &os.PathError{Op: "open", Path: p, Err: err}
	}
	return &dirFD{fd: fd}, nil
}

func (d *dirFD) close() {
	if d != nil && d.fd >= 0 {
		_ = unix.Close(d.fd)
		d.fd = -1
	}
}

// checkName refuses anything but one plain path component.
func checkName(name string) error {
	countOps(1)
	if name == "" || name == "." || name == ".." || strings.ContainsRune(name, '/') || strings.IndexByte(name, 0) >= 0 {
		return fmt.Errorf("%q is not a single path component: %w", name, errdefs.ErrInvalidArgument)
	}
	return nil
}

func (d *dirFD) err(op, name string, err error) error {
	return &os.PathError{Op: op, Path: join(d.rel, name), Err: err}
}

// open opens the child directory name, which must be a directory (not a
// symlink to one).
func (d *dirFD) open(name string) (*dirFD, error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	fd, err := unix.Openat(d.fd, name, dirFlags, 0)
	if err != nil {
		return nil, d.err("open", name, err)
	}
	return &dirFD{fd: fd, rel: join(d.rel, name)}, nil
}

// lstat returns the stat of name, ok=false if it does not exist.
func (d *dirFD) lstat(name string) (unix.Stat_t, bool, error) {
	var st unix.Stat_t
	if err := checkName(name); err != nil {
		return st, false, err
	}
	err := unix.Fstatat(d.fd, name, &st, unix.AT_SYMLINK_NOFOLLOW)
	switch {
	case err == nil:
		return st, true, nil
	case errors.Is(err, unix.ENOENT):
		return st, false, nil
	default:
		return st, false, d.err("lstat", name, err)
	}
}

func (d *dirFD) exists(name string) bool {
	_, ok, _ := d.lstat(name)
	return ok
}

func (d *dirFD) mkdir(name string, mode uint32) error {
	if err := checkName(name); err != nil {
		return err
	}
	if err := unix.Mkdirat(d.fd, name, mode); err != nil {
		return d.err("mkdir", name, err)
	}
	return nil
}

func (d *dirFD) symlink(target, name string) error {
	if err := checkName(name); err != nil {
		return err
	}
	if err := unix.Symlinkat(target, d.fd, name); err != nil {
		return d.err("symlink", name, err)
	}
	return nil
}

func (d *dirFD) readlink(name string) (string, error) {
	if err := checkName(name); err != nil {
		return "", err
	}
	for size := 256; ; size *= 2 {
		buf := make([]byte, size)
		n, err := unix.Readlinkat(d.fd, name, buf)
		if err != nil {
			return "", d.err("readlink", name, err)
		}
		if n < size {
			return string(buf[:n]), nil
		}
	}
}

func (d *dirFD) mknod(name string, mode uint32, dev int) error {
	if err := checkName(name); err != nil {
		return err
	}
	if err := unix.Mknodat(d.fd, name, mode, dev); err != nil {
		return d.err("mknod", name, err)
	}
	return nil
}

// create makes the regular file name, which must not exist.
func (d *dirFD) create(name string) (*os.File, error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	fd, err := unix.Openat(d.fd, name, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, d.err("create", name, err)
	}
	return os.NewFile(uintptr(fd), join(d.rel, name)), nil
}

// openRegular opens the regular file name for reading.
func (d *dirFD) openRegular(name string) (*os.File, error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	fd, err := unix.Openat(d.fd, name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, d.err("open", name, err)
	}
	f := os.NewFile(uintptr(fd), join(d.rel, name))
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
		_ = f.Close()
		return nil, d.err("open", name, unix.EINVAL)
	}
	return f, nil
}

// remove removes the non-directory or empty directory name.
func (d *dirFD) remove(name string) error {
	if err := checkName(name); err != nil {
		return err
	}
	err := unix.Unlinkat(d.fd, name, 0)
	if errors.Is(err, unix.EISDIR) {
		err = unix.Unlinkat(d.fd, name, unix.AT_REMOVEDIR)
	}
	if err != nil && !errors.Is(err, unix.ENOENT) {
		return d.err("remove", name, err)
	}
	return nil
}

// removeAll removes name and, if it is a directory, everything below it.
func (d *dirFD) removeAll(name string) error {
	st, ok, err := d.lstat(name)
	if err != nil || !ok {
		return err
	}
	if st.Mode&unix.S_IFMT == unix.S_IFDIR {
		sub, err := d.open(name)
		if err != nil {
			return err
		}
		names, err := sub.names()
		for _, n := range names {
			if err == nil {
				err = sub.removeAll(n)
			}
		}
		sub.close()
		if err != nil {
			return err
		}
	}
	return d.remove(name)
}

// names lists the directory's entries.
func (d *dirFD) names() ([]string, error) {
	// A fresh open file description: reading entries moves its offset.
	fd, err := unix.Openat(d.fd, ".", dirFlags, 0)
	if err != nil {
		return nil, d.err("open", ".", err)
	}
	f := os.NewFile(uintptr(fd), d.rel)
	defer func() { _ = f.Close() }()
	names, err := f.Readdirnames(-1)
	if err != nil {
		return nil, &os.PathError{Op: "readdir", Path: d.rel, Err: err}
	}
	countOps(1 + len(names))
	return names, nil
}

func linkAt(src *dirFD, sname string, dst *dirFD, dname string) error {
	if err := checkName(sname); err != nil {
		return err
	}
	if err := checkName(dname); err != nil {
		return err
	}
	// Flags 0: a symlink at sname is linked itself, never followed.
	if err := unix.Linkat(src.fd, sname, dst.fd, dname, 0); err != nil {
		return &os.LinkError{Op: "link", Old: join(src.rel, sname), New: join(dst.rel, dname), Err: err}
	}
	return nil
}

func renameAt(src *dirFD, sname string, dst *dirFD, dname string) error {
	if err := checkName(sname); err != nil {
		return err
	}
	if err := checkName(dname); err != nil {
		return err
	}
	if err := unix.Renameat(src.fd, sname, dst.fd, dname); err != nil {
		return &os.LinkError{Op: "rename", Old: join(src.rel, sname), New: join(dst.rel, dname), Err: err}
	}
	return nil
}

func (d *dirFD) lchown(name string, uid, gid int) error {
	if err := checkName(name); err != nil {
		return err
	}
	if err := unix.Fchownat(d.fd, name, uid, gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return d.err("lchown", name, err)
	}
	return nil
}

// inode opens name itself (a symlink is not followed) as an O_PATH handle.
func (d *dirFD) inode(name string) (*inodeFD, error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	fd, err := unix.Openat(d.fd, name, pathFlags, 0)
	if err != nil {
		return nil, d.err("open", name, err)
	}
	in := &inodeFD{fd: fd, rel: join(d.rel, name)}
	if err := unix.Fstat(fd, &in.st); err != nil {
		in.close()
		return nil, d.err("fstat", name, err)
	}
	return in, nil
}

// inodeFD pins one inode of a layer (an O_PATH handle). Calls that need a
// path go through /proc/self/fd/N, whose magic link leads to that very
// inode and is never resolved further: for a symlink, the symlink itself.
type inodeFD struct {
	fd  int
	rel string
	st  unix.Stat_t
}

func (in *inodeFD) close() { _ = unix.Close(in.fd) }

func (in *inodeFD) proc() string { return "/proc/self/fd/" + strconv.Itoa(in.fd) }

func (in *inodeFD) isSymlink() bool { return in.st.Mode&unix.S_IFMT == unix.S_IFLNK }

func (in *inodeFD) err(op string, err error) error {
	if errors.Is(err, unix.ENOENT) {
		if _, serr := os.Stat("/proc/self/fd"); serr != nil {
			err = fmt.Errorf("%w (the layer applier needs /proc mounted: %w)", err, serr)
		}
	}
	return &os.PathError{Op: op, Path: in.rel, Err: err}
}

func (in *inodeFD) chown(uid, gid int) error {
	if err := unix.Fchownat(in.fd, "", uid, gid, unix.AT_EMPTY_PATH); err != nil {
		return in.err("chown", err)
	}
	return nil
}

// chmod sets the permission bits; a symlink has none and is left alone.
// Neither form follows anything: fchmodat2 acts on the handle itself, and
// the /proc magic link leads to the handle's inode (chmod of it neither
// opens a device nor blocks on a FIFO, as an open for fchmod would).
func (in *inodeFD) chmod(mode uint32) error {
	if in.isSymlink() {
		return nil
	}
	var err error
	if emptyPathCalls() {
		err = unix.Fchmodat(in.fd, "", mode, unix.AT_EMPTY_PATH)
	} else {
		err = unix.Chmod(in.proc(), mode)
	}
	if err != nil {
		return in.err("chmod", err)
	}
	return nil
}

func (in *inodeFD) setTimes(ts [2]unix.Timespec) error {
	var err error
	if emptyPathCalls() {
		err = unix.UtimesNanoAt(in.fd, "", ts[:], unix.AT_EMPTY_PATH)
	} else {
		err = unix.UtimesNanoAt(unix.AT_FDCWD, in.proc(), ts[:], 0)
	}
	if err != nil {
		return in.err("utimes", err)
	}
	return nil
}

// hasXattr tells whether the inode has the xattr name.
func (in *inodeFD) hasXattr(name string) (bool, error) {
	_, err := unix.Getxattr(in.proc(), name, nil)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, unix.ENODATA) || errors.Is(err, unix.ENOTSUP):
		return false, nil
	default:
		return false, in.err("getxattr "+name, err)
	}
}

func (in *inodeFD) setXattr(name string, v []byte) error {
	if err := unix.Setxattr(in.proc(), name, v, 0); err != nil {
		return in.err("setxattr "+name, err)
	}
	return nil
}

func (in *inodeFD) listXattrs() ([]string, error) {
	names, err := listXattrsWith(func(b []byte) (int, error) { return unix.Listxattr(in.proc(), b) })
	if err != nil {
		return nil, in.err("listxattr", err)
	}
	return names, nil
}

func (in *inodeFD) getXattr(name string) ([]byte, error) {
	v, err := getXattrWith(func(b []byte) (int, error) { return unix.Getxattr(in.proc(), name, b) })
	if err != nil {
		return nil, in.err("getxattr "+name, err)
	}
	return v, nil
}

// listXattrsWith lists xattr names with a list call (any of the l/f/plain
// forms), growing the buffer as needed.
func listXattrsWith(list func([]byte) (int, error)) ([]string, error) {
	for size := 256; ; size *= 4 {
		buf := make([]byte, size)
		n, err := list(buf)
		if errors.Is(err, unix.ERANGE) {
			continue
		}
		if errors.Is(err, unix.ENOTSUP) {
			return nil, nil
		}
		if err != nil {
			return nil, err
		}
		var names []string
		for _, s := range strings.Split(string(buf[:n]), "\x00") {
			if s != "" {
				names = append(names, s)
			}
		}
		return names, nil
	}
}

func getXattrWith(get func([]byte) (int, error)) ([]byte, error) {
	for size := 256; ; size *= 4 {
		buf := make([]byte, size)
		n, err := get(buf)
		if errors.Is(err, unix.ERANGE) {
			continue
		}
		if err != nil {
			return nil, err
		}
		return buf[:n], nil
	}
}

// listXattrs and getXattr read the xattrs of a path (not followed): for
// tests and tools that look at a layer from outside.
func listXattrs(p string) ([]string, error) {
	names, err := listXattrsWith(func(b []byte) (int, error) { return unix.Llistxattr(p, b) })
	if err != nil {
		return nil, &os.PathError{Op: "llistxattr", Path: p, Err: err}
	}
	return names, nil
}

func getXattr(p, name string) ([]byte, error) {
	v, err := getXattrWith(func(b []byte) (int, error) { return unix.Lgetxattr(p, name, b) })
	if err != nil {
		return nil, &os.PathError{Op: "lgetxattr " + name, Path: p, Err: err}
	}
	return v, nil
}

// isDir and isSymlink read a stat's type.
func isDir(st *unix.Stat_t) bool     { return st.Mode&unix.S_IFMT == unix.S_IFDIR }
func isSymlink(st *unix.Stat_t) bool { return st.Mode&unix.S_IFMT == unix.S_IFLNK }

// Xattrs of the directory itself (a real descriptor: f*xattr work on it).

func (d *dirFD) getXattrSelf(name string) ([]byte, error) {
	return getXattrWith(func(b []byte) (int, error) { return unix.Fgetxattr(d.fd, name, b) })
}

func (d *dirFD) setXattrSelf(name string, v []byte) error {
	if err := unix.Fsetxattr(d.fd, name, v, 0); err != nil {
		return &os.PathError{Op: "setxattr " + name, Path: d.rel, Err: err}
	}
	return nil
}

func (d *dirFD) removeXattrSelf(name string) error {
	err := unix.Fremovexattr(d.fd, name)
	if err != nil && !errors.Is(err, unix.ENODATA) && !errors.Is(err, unix.ENOTSUP) {
		return &os.PathError{Op: "removexattr " + name, Path: d.rel, Err: err}
	}
	return nil
}

func (d *dirFD) fstat() (unix.Stat_t, error) {
	var st unix.Stat_t
	if err := unix.Fstat(d.fd, &st); err != nil {
		return st, &os.PathError{Op: "fstat", Path: d.rel, Err: err}
	}
	return st, nil
}

// futimens sets the times of an open file (utimensat with a NULL path,
// which every kernel takes; the x/sys wrapper passes "" instead).
func futimens(fd int, ts [2]unix.Timespec) error {
	_, _, e := unix.Syscall6(unix.SYS_UTIMENSAT, uintptr(fd), 0, uintptr(unsafe.Pointer(&ts[0])), 0, 0, 0)
	if e != 0 {
		return e
	}
	return nil
}

// Metadata calls on O_PATH handles: where the kernel has fchmodat2 (Linux
// 6.6), chmod and utimensat act on the handle with AT_EMPTY_PATH; older
// kernels (4.18 and up) go through the handle's /proc/self/fd magic link.
// Owners (fchownat with AT_EMPTY_PATH) and xattrs (the magic link) have one
// form on every kernel.
const (
	callsProbe int32 = iota
	callsEmptyPath
	callsProc
)

// metaCalls is the form in use: probed on first use; tests force either.
var metaCalls atomic.Int32

func emptyPathCalls() bool {
	c := metaCalls.Load()
	if c == callsProbe {
		c = probeMetaCalls()
		metaCalls.CompareAndSwap(callsProbe, c)
	}
	return c == callsEmptyPath
}

// probeMetaCalls asks for fchmodat2 and utimensat with AT_EMPTY_PATH on no
// file: EBADF means the kernel takes the call; ENOSYS, EINVAL (or EPERM
// from a seccomp filter that predates fchmodat2) that it does not.
func probeMetaCalls() int32 {
	empty := []byte{0}
	_, _, e := unix.Syscall6(unix.SYS_FCHMODAT2, ^uintptr(0), uintptr(unsafe.Pointer(&empty[0])), 0, unix.AT_EMPTY_PATH, 0, 0)
	if e != unix.EBADF {
		return callsProc
	}
	var ts [2]unix.Timespec
	_, _, e = unix.Syscall6(unix.SYS_UTIMENSAT, ^uintptr(0), uintptr(unsafe.Pointer(&empty[0])), uintptr(unsafe.Pointer(&ts[0])), unix.AT_EMPTY_PATH, 0, 0)
	if e != unix.EBADF {
		return callsProc
	}
	return callsEmptyPath
}
