package layer

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Export writes the OCI layer tar of the changes held in upper, a
// fuse-overlayfs upper directory (or a layer directory without parent),
// over the layer directories lowers (newest first). It reads the upper
// directory through handles (never through a FUSE mount) and looks at the
// lower layers only to decide whether a whiteout or an opaque marker hides
// anything.
//
// What fuse-overlayfs 1.10 leaves in an upper directory at run time,
// measured on Debian 12 (kernel 6.18) as root, and the entries Export makes
// of it:
//
//   - rm of a lower file or directory: a 0/0 character device of mode 0
//     named like it (`.wh.NAME` empty files where mknod is refused, as on a
//     snapshotter root on kernel overlay or in some user namespaces):
//     -> a `.wh.NAME` entry, when a lower layer shows NAME.
//   - mkdir through the mount (a new directory, or `rm -rf d; mkdir d` of a
//     lower one): the directory with three markers, trusted.overlay.opaque=y
//     (user.fuseoverlayfs.opaque=y in a user namespace), an empty file
//     `.wh..wh..opq` (mode 0700) and a 0/0 device `.wh..opq` (mode 0700)
//     -> when a lower layer has a directory there, a whiteout `.wh.DIR`
//     right before the directory (containerd's applier then drops the
//     lower directory with its xattrs; `DIR/.wh..wh..opq` would keep the
//     lower directory's own xattrs); the markers themselves are not emitted.
//   - chmod, chown, touch, setxattr of a lower file: a full copy-up (same
//     content) with the new metadata and user.fuseoverlayfs.origin=<lower
//     path> -> the file with its new metadata; fuse-overlayfs' own xattrs
//     are left out. A write or append copies up the same way.
//   - rename of a lower file a -> b: b copied up (origin xattr) and a 0/0
//     device at a -> b, and `.wh.a`.
//   - rename of a lower directory d -> d2: the whole tree copied up under
//     d2, d2 marked opaque with all three markers, each subdirectory with
//     the opaque xattr and a `.wh..wh..opq` file (no `.wh..opq` device), and
//     a 0/0 device at d -> d2 with its whole content (preceded by `.wh.d2`
//     only if a lower layer has a directory d2), and `.wh.d`.
//   - hard link to a lower file: the file copied up, both names one inode
//     in the upper -> the first name (in walk order) as a file, the others
//     as tar hard links to it. Same for links between new files.
//   - symlinks, FIFOs, devices: as made -> the same entry types.
//   - ID-mapped mounts (uidmapping=/gidmapping=, container:host:size) store
//     the container's IDs in the upper directory (a file chowned to host
//     100007 through a 0:100000:65536 mount is stored with uid 7), so the
//     tar carries the stored IDs unchanged: the container's IDs.
//
// Every directory of the upper directory is emitted (it is there because
// something in it changed, or as a copy-up on the way); so are copied-up
// files whose content and metadata did not change (they are few; leaving
// them out would need a content comparison with the lower file).
func Export(ctx context.Context, w io.Writer, upper string, opts ExportOptions) error {
	root, err := openLayerDir(upper)
	if err != nil {
		return err
	}
	defer root.close()
	stack, err := openStack(opts.Lowers)
	if err != nil {
		return err
	}
	defer stack.close()
	e := &exporter{ctx: ctx, tw: tar.NewWriter(w), lowers: stack, epoch: opts.SourceDateEpoch, links: map[[2]uint64]string{}}
	opaque := isOpaque(root) || hasOpqDevice(root)
	if opaque && len(stack.roots) > 0 {
		if err := e.opaqueMarker(""); err != nil {
			return err
		}
	}
	if err := e.dir(root, opaque || len(stack.roots) == 0); err != nil {
		return err
	}
	return e.tw.Close()
}

// ExportOptions configure Export.
type ExportOptions struct {
	// Lowers are the layer directories under the upper one, newest first.
	Lowers []string
	// SourceDateEpoch, if set, caps the modification times in the tar.
	SourceDateEpoch *time.Time
}

type exporter struct {
	ctx    context.Context
	tw     *tar.Writer
	lowers *layerStack
	epoch  *time.Time
	links  map[[2]uint64]string // device, inode -> first tar name
	buf    []byte
}

const whOpaqueDev = ".wh..opq" // fuse-overlayfs' 0/0 device marker of an opaque directory

func hasOpqDevice(d *dirFD) bool {
	st, ok, err := d.lstat(whOpaqueDev)
	return err == nil && ok && isWhiteoutDev(&st)
}

// dir emits the entries of the upper directory d. hidden: nothing of the
// lower layers shows in d (it is opaque, or lies in an opaque or new tree).
func (e *exporter) dir(d *dirFD, hidden bool) error {
	if err := e.ctx.Err(); err != nil {
		return err
	}
	names, err := d.names()
	if err != nil {
		return err
	}
	sort.Strings(names)
	present := make(map[string]bool, len(names))
	sts := make(map[string]unix.Stat_t, len(names))
	for _, n := range names {
		st, ok, err := d.lstat(n)
		if err != nil {
			return err
		}
		if !ok {
			continue // gone meanwhile
		}
		sts[n] = st
		if !isWhiteoutDev(&st) {
			present[n] = true
		}
	}
	for _, n := range names {
		st, ok := sts[n]
		if !ok {
			continue
		}
		rel := join(d.rel, n)
		// Whiteouts and markers.
		if strings.HasPrefix(n, whMetaPfx) || (n == whOpaqueDev && isWhiteoutDev(&st)) {
			continue // .wh..wh..opq and AUFS metadata, .wh..opq device: read with the directory
		}
		hiddenName := ""
		switch {
		case isWhiteoutDev(&st):
			hiddenName = n
		case strings.HasPrefix(n, whPrefix) && st.Mode&unix.S_IFMT == unix.S_IFREG:
			hiddenName = strings.TrimPrefix(n, whPrefix)
			if present[hiddenName] {
				continue // re-created: the entry itself replaces the lower one
			}
		}
		if hiddenName != "" {
			if hidden {
				continue
			}
			if _, _, found, err := e.lowers.lookup(join(d.rel, hiddenName)); err != nil {
				return err
			} else if !found {
				continue
			}
			if err := e.whiteout(join(d.rel, whPrefix+hiddenName)); err != nil {
				return err
			}
			continue
		}
		if err := e.entry(d, n, rel, &st, hidden); err != nil {
			return err
		}
	}
	return nil
}

func (e *exporter) whiteout(name string) error {
	t := time.Unix(0, 0).UTC()
	return e.tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, ModTime: t, AccessTime: t, ChangeTime: t, Format: tar.FormatPAX})
}

func (e *exporter) opaqueMarker(dir string) error {
	return e.whiteout(join(dir, whOpaqueTar))
}

// entry emits the file name of d and, for a directory, what it holds.
func (e *exporter) entry(d *dirFD, name, rel string, st *unix.Stat_t, hidden bool) error {
	hdr := &tar.Header{
		Name:    rel,
		Mode:    int64(st.Mode & 0o7777),
		Uid:     int(st.Uid),
		Gid:     int(st.Gid),
		ModTime: time.Unix(st.Mtim.Sec, 0),
		Format:  tar.FormatPAX,
	}
	if e.epoch != nil && hdr.ModTime.After(*e.epoch) {
		hdr.ModTime = *e.epoch
	}
	var file *os.File
	var sub *dirFD
	defer func() {
		if file != nil {
			_ = file.Close()
		}
		if sub != nil {
			sub.close()
		}
	}()
	var xattrs func() ([]string, func(string) ([]byte, error), error)
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		hdr.Typeflag = tar.TypeDir
		hdr.Name += "/"
		var err error
		if sub, err = d.open(name); err != nil {
			return err
		}
		xattrs = func() ([]string, func(string) ([]byte, error), error) {
			names, err := listXattrsWith(func(b []byte) (int, error) { return unix.Flistxattr(sub.fd, b) })
			return names, sub.getXattrSelf, err
		}
	case unix.S_IFREG:
		key := [2]uint64{st.Dev, st.Ino}
		if st.Nlink > 1 {
			if first, ok := e.links[key]; ok {
				hdr.Typeflag = tar.TypeLink
				hdr.Linkname = first
				return e.tw.WriteHeader(hdr)
			}
			e.links[key] = rel
		}
		hdr.Typeflag = tar.TypeReg
		var err error
		if file, err = d.openRegular(name); err != nil {
			return err
		}
		var fst unix.Stat_t
		if err := unix.Fstat(int(file.Fd()), &fst); err != nil {
			return d.err("fstat", name, err)
		}
		hdr.Size = fst.Size
		fd := int(file.Fd())
		xattrs = func() ([]string, func(string) ([]byte, error), error) {
			names, err := listXattrsWith(func(b []byte) (int, error) { return unix.Flistxattr(fd, b) })
			return names, func(x string) ([]byte, error) {
				return getXattrWith(func(b []byte) (int, error) { return unix.Fgetxattr(fd, x, b) })
			}, err
		}
	case unix.S_IFLNK:
		hdr.Typeflag = tar.TypeSymlink
		target, err := d.readlink(name)
		if err != nil {
			return err
		}
		hdr.Linkname = target
	case unix.S_IFCHR, unix.S_IFBLK, unix.S_IFIFO:
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFCHR:
			hdr.Typeflag = tar.TypeChar
		case unix.S_IFBLK:
			hdr.Typeflag = tar.TypeBlock
		default:
			hdr.Typeflag = tar.TypeFifo
		}
		hdr.Devmajor = int64(unix.Major(st.Rdev))
		hdr.Devminor = int64(unix.Minor(st.Rdev))
	default:
		return nil // sockets are not carried, as containerd's differ does
	}
	if xattrs == nil {
		in, err := d.inode(name)
		if err != nil {
			return err
		}
		defer in.close()
		xattrs = func() ([]string, func(string) ([]byte, error), error) {
			names, err := in.listXattrs()
			return names, in.getXattr, err
		}
	}
	names, get, err := xattrs()
	if err != nil {
		return fmt.Errorf("list xattrs of %s: %w", rel, err)
	}
	for _, x := range names {
		if droppedXattr(x) || strings.HasPrefix(x, "security.fuseoverlayfs") {
			continue
		}
		v, err := get(x)
		if err != nil {
			if ignorableXattrErr(err) || errors.Is(err, unix.ENODATA) {
				continue
			}
			return fmt.Errorf("get xattr %s of %s: %w", x, rel, err)
		}
		if hdr.PAXRecords == nil {
			hdr.PAXRecords = map[string]string{}
		}
		hdr.PAXRecords[paxXattr+x] = string(v)
	}
	var opaque bool
	if sub != nil {
		opaque = isOpaque(sub) || hasOpqDevice(sub)
		if opaque && !hidden {
			// A directory made through the mount over a lower one (rm -rf
			// and mkdir, a rename onto it): whiteout and re-create, so that
			// nothing of the lower directory (xattrs included) is kept.
			// The OCI spec lets a whiteout hide only lower layers' files,
			// and containerd's applier reads the whiteout first.
			_, lst, found, err := e.lowers.lookup(rel)
			if err != nil {
				return err
			}
			if found && isDir(&lst) {
				if err := e.whiteout(join(d.rel, whPrefix+name)); err != nil {
					return err
				}
			}
		}
	}
	if err := e.tw.WriteHeader(hdr); err != nil {
		return err
	}
	if file != nil && hdr.Size > 0 {
		if e.buf == nil {
			e.buf = make([]byte, exportChunk)
		}
		if err := exportData(e.ctx, e.tw, file, hdr.Size, e.buf); err != nil {
			return fmt.Errorf("copy %s: %w", rel, err)
		}
	}
	if sub == nil {
		return nil
	}
	return e.dir(sub, hidden || opaque)
}
