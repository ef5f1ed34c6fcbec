package layer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"

	"golang.org/x/sys/unix"
)

// copyXattrs copies the xattrs of src to dst, leaving out fuse-overlayfs'
// and overlay's own (opacity and the like belong to a layer, not to a file)
// and, with keep, those dst has already.
func copyXattrs(src, dst *inodeFD, keep bool) error {
	names, err := src.listXattrs()
	if err != nil {
		return err
	}
	have := map[string]bool{}
	if keep {
		own, err := dst.listXattrs()
		if err != nil {
			return err
		}
		for _, n := range own {
			have[n] = true
		}
	}
	for _, n := range names {
		if have[n] {
			continue
		}
		if strings.HasPrefix(n, "trusted.overlay.") || strings.HasPrefix(n, "user.fuseoverlayfs.") || strings.HasPrefix(n, "user.overlay.") {
			continue
		}
		v, err := src.getXattr(n)
		if err != nil {
			return err
		}
		if err := dst.setXattr(n, v); err != nil && !ignorableXattrErr(err) {
			return err
		}
	}
	return nil
}

func ignorableXattrErr(err error) bool {
	return errors.Is(err, unix.ENOTSUP) || (errors.Is(err, unix.EPERM) && inUserNS())
}

// copyMetaAt gives dbase in dst the owner, mode, xattrs and times of sbase
// in src.
func copyMetaAt(src *dirFD, sbase string, dst *dirFD, dbase string) error {
	s, err := src.inode(sbase)
	if err != nil {
		return err
	}
	defer s.close()
	d, err := dst.inode(dbase)
	if err != nil {
		return err
	}
	defer d.close()
	if err := d.chown(int(s.st.Uid), int(s.st.Gid)); err != nil {
		return err
	}
	if err := d.chmod(s.st.Mode & 0o7777); err != nil {
		return err
	}
	if err := copyXattrs(s, d, false); err != nil {
		return err
	}
	return d.setTimes([2]unix.Timespec{s.st.Atim, s.st.Mtim})
}

// copyUp copies the non-directory sbase of src (stat st: file, symlink,
// device, FIFO) with its metadata to dbase in dst, which must not exist.
func copyUp(ctx context.Context, src *dirFD, sbase string, st *unix.Stat_t, dst *dirFD, dbase string) error {
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		if err := copyFile(ctx, src, sbase, dst, dbase); err != nil {
			return err
		}
	case unix.S_IFLNK:
		target, err := src.readlink(sbase)
		if err != nil {
			return err
		}
		if err := dst.symlink(target, dbase); err != nil {
			return err
		}
	case unix.S_IFCHR, unix.S_IFBLK, unix.S_IFIFO, unix.S_IFSOCK:
		if err := dst.mknod(dbase, st.Mode, int(st.Rdev)); err != nil {
			return err
		}
	default:
		return fmt.Errorf("copy up %s: unsupported file type %o", join(src.rel, sbase), st.Mode&unix.S_IFMT)
	}
	return copyMetaAt(src, sbase, dst, dbase)
}

func copyFile(ctx context.Context, src *dirFD, sbase string, dst *dirFD, dbase string) error {
	in, err := src.openRegular(sbase)
	if err != nil {
		return err
	}
	defer func() { _ = in.Close() }()
	out, err := dst.create(dbase)
	if err != nil {
		return err
	}
	// os.File to os.File: copy_file_range, in chunks so that a
	// cancellation is seen.
	for {
		if err := ctx.Err(); err != nil {
			_ = out.Close()
			return err
		}
		n, err := io.CopyN(out, in, 64<<20)
		if errors.Is(err, io.EOF) || (err == nil && n == 0) {
			break
		}
		if err != nil {
			_ = out.Close()
			return fmt.Errorf("copy %s to %s: %w", in.Name(), out.Name(), err)
		}
	}
	return out.Close()
}
