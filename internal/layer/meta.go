package layer

import (
	"archive/tar"
	"errors"
	"io"
	"os"
	"strings"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// writeFile creates the regular file base in parent with the entry's
// content and metadata.
func (w *writer) writeFile(parent *dirFD, base string, hdr *tar.Header, r io.Reader) error {
	f, err := parent.create(base)
	if err != nil {
		return err
	}
	err = w.writeData(f, r)
	fd := int(f.Fd())
	if err == nil {
		if err = unix.Fchown(fd, hdr.Uid, hdr.Gid); err != nil {
			err = &os.PathError{Op: "chown", Path: f.Name(), Err: err}
		}
	}
	if err == nil {
		if err = unix.Fchmod(fd, uint32(hdr.Mode&0o7777)); err != nil {
			err = &os.PathError{Op: "chmod", Path: f.Name(), Err: err}
		}
	}
	if err == nil {
		err = w.setXattrs(hdr, f.Name(), true, func(name string, v []byte) error {
			return unix.Fsetxattr(fd, name, v, 0)
		})
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	return parent.setTimes(base, entryTimes(hdr))
}

// writeContent copies the entry's content into f. The context is checked
// between chunks, so a cancelled unpack stops inside a big entry too.
// (Sparse entries are written by sparseData.writeTo.)
func (w *writer) writeContent(f *os.File, r io.Reader) error {
	if w.buf == nil {
		w.buf = make([]byte, 1<<20)
	}
	for {
		if err := w.ctx.Err(); err != nil {
			return err
		}
		n, rerr := r.Read(w.buf)
		if n > 0 {
			if _, err := f.Write(w.buf[:n]); err != nil {
				return err
			}
		}
		if errors.Is(rerr, io.EOF) {
			break
		}
		if rerr != nil {
			return rerr
		}
	}
	return nil
}

// setMeta gives base in parent (not a regular file being written) the
// entry's owner, mode, xattrs and times; directory times are set at the
// end. base is one component in a directory handle and no call follows it
// if it is a symlink (chmod, which would, is not made on one).
func (w *writer) setMeta(parent *dirFD, base string, hdr *tar.Header) error {
	st, ok, err := parent.lstat(base)
	if err != nil {
		return err
	}
	if !ok {
		return parent.err("lstat", base, unix.ENOENT)
	}
	return w.setMetaOf(parent, base, &st, hdr)
}

// setMetaOf is setMeta for base whose type st already tells.
func (w *writer) setMetaOf(parent *dirFD, base string, st *unix.Stat_t, hdr *tar.Header) error {
	if err := parent.lchown(base, hdr.Uid, hdr.Gid); err != nil {
		return err
	}
	// Not by the tar entry's type: a hard-link entry can name a symlink,
	// whose mode means nothing.
	if !isSymlink(st) {
		if err := parent.chmod(base, uint32(hdr.Mode&0o7777)); err != nil {
			return err
		}
	}
	if err := w.setXattrsAt(parent, base, st, hdr); err != nil {
		return err
	}
	if isDir(st) {
		w.rec.dirTimes(join(parent.rel, base), entryTimes(hdr))
		return nil
	}
	return parent.setTimes(base, entryTimes(hdr))
}

// setXattrsAt sets the entry's xattrs on base through a handle on its inode.
func (w *writer) setXattrsAt(parent *dirFD, base string, st *unix.Stat_t, hdr *tar.Header) error {
	if !hasXattrs(hdr) {
		return nil
	}
	in, err := parent.inode(base)
	if err != nil {
		return err
	}
	defer in.close()
	regOrDir := st.Mode&unix.S_IFMT == unix.S_IFREG || isDir(st)
	return w.setXattrs(hdr, in.rel, regOrDir, in.setXattrRaw)
}

func hasXattrs(hdr *tar.Header) bool {
	for k := range hdr.PAXRecords {
		if strings.HasPrefix(k, paxXattr) {
			return true
		}
	}
	return false
}

func (in *inodeFD) setXattrRaw(name string, v []byte) error {
	return unix.Setxattr(in.proc(), name, v, 0)
}

const paxXattr = "SCHILY.xattr."

// droppedXattr tells the xattrs a layer may not set: trusted.* (as
// containerd does; they could fake kernel overlay markers), and those
// fuse-overlayfs or a kernel overlay in a user namespace read as
// instructions (owners, modes, opacity): user.fuseoverlayfs.*,
// security.fuseoverlayfs.*, user.overlay.* and containers' override_stat,
// which fuse-overlayfs 1.10 also honours.
func droppedXattr(name string) bool {
	return strings.HasPrefix(name, "trusted.") ||
		strings.HasPrefix(name, "user.fuseoverlayfs.") ||
		strings.HasPrefix(name, "security.fuseoverlayfs.") ||
		strings.HasPrefix(name, "user.overlay.") ||
		strings.HasPrefix(name, "user.containers.override_stat")
}

// setXattrs sets the entry's xattrs with set, leaving out those a layer
// may not set and those the filesystem refuses or that user.* cannot have
// on this file type (regOrDir false).
func (w *writer) setXattrs(hdr *tar.Header, rel string, regOrDir bool, set func(string, []byte) error) error {
	for k, v := range hdr.PAXRecords {
		name, ok := strings.CutPrefix(k, paxXattr)
		if !ok {
			continue
		}
		if droppedXattr(name) {
			log.G(w.ctx).WithField("xattr", name).WithField("path", rel).Debug("ignoring xattr from layer")
			continue
		}
		if err := set(name, []byte(v)); err != nil {
			if errors.Is(err, unix.ENOTSUP) || (errors.Is(err, unix.EPERM) && !regOrDir && strings.HasPrefix(name, "user.")) {
				log.G(w.ctx).WithError(err).WithField("xattr", name).WithField("path", rel).Debug("ignoring xattr")
				continue
			}
			return &os.PathError{Op: "setxattr " + name, Path: rel, Err: err}
		}
	}
	return nil
}

func entryTimes(hdr *tar.Header) [2]unix.Timespec {
	atime := hdr.AccessTime
	if hdr.ModTime.After(atime) {
		atime = hdr.ModTime
	}
	return [2]unix.Timespec{toTimespec(atime), toTimespec(hdr.ModTime)}
}

func toTimespec(t time.Time) unix.Timespec {
	if t.IsZero() || t.Before(time.Unix(0, 0)) {
		return unix.Timespec{}
	}
	return unix.NsecToTimespec(t.UnixNano())
}

// setDirTimes sets the recorded directory times, walking the layer one
// directory handle at a time; a recorded directory no longer there as a
// directory is passed over.
func (w *writer) setDirTimes() error {
	return setTimesBelow(w.root, &w.rec.names)
}

func setTimesBelow(d *dirFD, n *node) error {
	for name, k := range n.kids {
		if len(k.kids) > 0 {
			sub, err := d.open(name)
			if err == nil {
				err = setTimesBelow(sub, k)
				sub.close()
			} else if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ELOOP) {
				continue // gone, or no longer a directory
			}
			if err != nil {
				return err
			}
		}
		if k.times == nil {
			continue
		}
		st, ok, err := d.lstat(name)
		if err != nil {
			return err
		}
		if ok && isDir(&st) {
			if err := d.setTimes(name, *k.times); err != nil {
				return err
			}
		}
	}
	return nil
}
