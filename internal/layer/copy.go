package layer

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// copyXattrs copies the xattrs of src to dst (neither followed if a symlink),
// leaving out fuse-overlayfs' own (opacity and the like belong to a layer,
// not to a file).
func copyXattrs(src, dst string) error {
	names, err := listXattrs(src)
	if err != nil {
		return err
	}
	for _, n := range names {
		if strings.HasPrefix(n, "trusted.overlay.") || strings.HasPrefix(n, "user.fuseoverlayfs.") {
			continue
		}
		v, err := getXattr(src, n)
		if err != nil {
			return err
		}
		if err := unix.Lsetxattr(dst, n, v, 0); err != nil && !ignorableXattrErr(err) {
			return errno("lsetxattr "+n, dst, err)
		}
	}
	return nil
}

func ignorableXattrErr(err error) bool {
	return errors.Is(err, unix.ENOTSUP) || (errors.Is(err, unix.EPERM) && inUserNS())
}

func listXattrs(p string) ([]string, error) {
	size := 256
	for {
		buf := make([]byte, size)
		n, err := unix.Llistxattr(p, buf)
		if errors.Is(err, unix.ERANGE) {
			size *= 4
			continue
		}
		if errors.Is(err, unix.ENOTSUP) {
			return nil, nil
		}
		if err != nil {
			return nil, errno("llistxattr", p, err)
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

func getXattr(p, name string) ([]byte, error) {
	size := 256
	for {
		buf := make([]byte, size)
		n, err := unix.Lgetxattr(p, name, buf)
		if errors.Is(err, unix.ERANGE) {
			size *= 4
			continue
		}
		if err != nil {
			return nil, errno("lgetxattr "+name, p, err)
		}
		return buf[:n], nil
	}
}

// copyMeta gives dst the owner, mode, xattrs and times of src (a stat of
// srcPath).
func copyMeta(srcPath string, st *unix.Stat_t, dst string) error {
	if err := lchown(dst, int(st.Uid), int(st.Gid)); err != nil {
		return err
	}
	if err := chmodNoFollow(dst, st.Mode&0o7777); err != nil {
		return err
	}
	if err := copyXattrs(srcPath, dst); err != nil {
		return err
	}
	ts := []unix.Timespec{st.Atim, st.Mtim}
	if err := unix.UtimesNanoAt(unix.AT_FDCWD, dst, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return errno("utimes", dst, err)
	}
	return nil
}

// copyUp copies the non-directory src (file, symlink, device, FIFO) with its
// metadata to dst, which must not exist.
func copyUp(src string, st *unix.Stat_t, dst string) error {
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		if err := copyFile(src, dst); err != nil {
			return err
		}
	case unix.S_IFLNK:
		target, err := os.Readlink(src)
		if err != nil {
			return err
		}
		if err := os.Symlink(target, dst); err != nil {
			return err
		}
	case unix.S_IFCHR, unix.S_IFBLK, unix.S_IFIFO, unix.S_IFSOCK:
		if err := unix.Mknod(dst, st.Mode, int(st.Rdev)); err != nil {
			return errno("mknod", dst, err)
		}
	default:
		return fmt.Errorf("copy up %s: unsupported file type %o", src, st.Mode&unix.S_IFMT)
	}
	return copyMeta(src, st, dst)
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer func() { _ = in.Close() }()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		_ = out.Close()
		return fmt.Errorf("copy %s to %s: %w", src, dst, err)
	}
	return out.Close()
}
