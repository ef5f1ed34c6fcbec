package layer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
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

// copyChunk bounds one copy call: the context is checked between chunks.
const copyChunk = 8 << 20

// copyFile copies the regular file sbase of src to the new file dbase in
// dst. Only the data regions are copied (SEEK_DATA, SEEK_HOLE): a lower
// file of 1 TiB apparent size and 4 KiB of data stays 4 KiB allocated in
// the layer.
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
	if err := copyData(ctx, in, out); err != nil {
		_ = out.Close()
		return fmt.Errorf("copy %s to %s: %w", in.Name(), out.Name(), err)
	}
	return out.Close()
}

// copyData copies in's data regions to the same offsets of out, an empty
// file, and gives out in's size.
func copyData(ctx context.Context, in, out *os.File) error {
	var st unix.Stat_t
	if err := unix.Fstat(int(in.Fd()), &st); err != nil {
		return err
	}
	err := forData(ctx, in, st.Size, func(off, n int64) error {
		return copyRange(ctx, in, out, off, n)
	})
	if err != nil {
		return err
	}
	dataOps.Add(1)
	return out.Truncate(st.Size)
}

// forData calls fn for each data region [off, off+n) of f below size, in
// order, as SEEK_DATA and SEEK_HOLE find them (the whole file where the
// file system cannot tell).
func forData(ctx context.Context, f *os.File, size int64, fn func(off, n int64) error) error {
	fd := int(f.Fd())
	for off := int64(0); off < size; {
		if err := ctx.Err(); err != nil {
			return err
		}
		dataOps.Add(2)
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			return nil // a hole up to the end
		}
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP) {
			return fn(off, size-off)
		}
		if err != nil {
			return fmt.Errorf("seek data of %s: %w", f.Name(), err)
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return fmt.Errorf("seek hole of %s: %w", f.Name(), err)
		}
		if data >= size {
			return nil
		}
		hole = min(hole, size)
		if err := fn(data, hole-data); err != nil {
			return err
		}
		off = hole
	}
	return nil
}

// copyRange copies [off, off+n) of in to the same place in out, in chunks:
// copy_file_range, or read and write where the kernel refuses it (another
// file system on some kernels, FUSE).
func copyRange(ctx context.Context, in, out *os.File, off, n int64) error {
	var buf []byte
	for done := int64(0); done < n; {
		if err := ctx.Err(); err != nil {
			return err
		}
		chunk := min(n-done, copyChunk)
		roff, woff := off+done, off+done
		dataOps.Add(1)
		var c int
		var err error
		if buf == nil {
			c, err = unix.CopyFileRange(int(in.Fd()), &roff, int(out.Fd()), &woff, int(chunk), 0)
			if errors.Is(err, unix.EXDEV) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP) {
				buf = make([]byte, min(n, 1<<20))
				continue
			}
		} else {
			c, err = in.ReadAt(buf[:min(chunk, int64(len(buf)))], off+done)
			if c > 0 {
				if _, werr := out.WriteAt(buf[:c], off+done); werr != nil {
					return werr
				}
			}
			if errors.Is(err, io.EOF) {
				err = nil
			}
		}
		if err != nil {
			return err
		}
		if c == 0 {
			return fmt.Errorf("%s shrank to %d bytes while being copied", in.Name(), off+done)
		}
		done += int64(c)
	}
	return nil
}
