package layer

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
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
//     -> when a lower layer has a directory there, the directory followed
//     by its opaque marker `DIR/.wh..wh..opq`, then its content; the
//     fuse-overlayfs markers themselves are not emitted. (`.wh.DIR` then
//     `DIR/` is valid OCI too, but containerd 2.4's overlayfs applier turns
//     it into a non-opaque directory that shows the lower files.) The same
//     for a directory a container marked user.overlay.opaque=y, which
//     fuse-overlayfs 1.10 honours from its next mount on.
//   - chmod, chown, touch, setxattr of a lower file: a full copy-up (same
//     content) with the new metadata and user.fuseoverlayfs.origin=<lower
//     path> -> the file with its new metadata; fuse-overlayfs' own xattrs
//     are left out. A write or append copies up the same way; so does a
//     mere open for writing, which changes nothing (mtime kept to the ns).
//   - a directory is copied up (with a new mtime) whenever something in it
//     is.
//   - a name `.wh.NAME` made through the mount (fuse-overlayfs refuses
//     files of that name, not directories): from the next mount on,
//     fuse-overlayfs hides both it and NAME -> `.wh.NAME` when a lower
//     layer shows NAME, never its content.
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
// Entries that only reflect fuse-overlayfs' copy-ups are left out, as
// containerd's walking differ leaves them out (continuity v0.5.0
// fs/path.go sameFile, and the parents containerd v2.4.2
// pkg/archive/tar.go ChangeWriter adds): a directory over a lower one with
// the same type, mode, owner and xattrs is written only as the parent of
// something written below it (its mtime is not compared: copy-up changes
// it); a copied-up regular file with one link and the lower file's mode,
// owner, size, mtime (to the nanosecond, a nonzero one) and xattrs is not
// written. A whiteout is written at most once per name.
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
	opaque := exportOpaque(root)
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
	// pending are directory headers written only if something under them
	// is (outermost first); write flushes them.
	pending []*tar.Header
}

// write writes hdr after the pending directories it lies in.
func (e *exporter) write(hdr *tar.Header) error {
	for _, p := range e.pending {
		if err := e.tw.WriteHeader(p); err != nil {
			return err
		}
	}
	e.pending = e.pending[:0]
	return e.tw.WriteHeader(hdr)
}

// originXattr marks a file fuse-overlayfs copied up from a lower layer.
const originXattr = "user.fuseoverlayfs.origin"

// userOpaqueXattr is what an unprivileged container can set on a directory
// through the mount; fuse-overlayfs 1.10 treats it as opaque once remounted
// (measured).
const userOpaqueXattr = "user.overlay.opaque"

// exportOpaque reports whether fuse-overlayfs shows d as opaque: any of its
// markers, or user.overlay.opaque=y.
func exportOpaque(d *dirFD) bool {
	if isOpaque(d) || hasOpqDevice(d) {
		return true
	}
	v, err := d.getXattrSelf(userOpaqueXattr)
	return err == nil && string(v) == "y"
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
	whited := map[string]bool{} // names whited out already
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
		case strings.HasPrefix(n, whPrefix):
			// Whatever its type (a container can mkdir `.wh.NAME`):
			// fuse-overlayfs hides it and NAME; its content never shows.
			hiddenName = strings.TrimPrefix(n, whPrefix)
			if hiddenName == "" || present[hiddenName] {
				continue // `.wh.` hides nothing; re-created: the entry itself replaces the lower one
			}
		}
		if hiddenName != "" {
			if hidden || whited[hiddenName] {
				continue
			}
			whited[hiddenName] = true
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
	return e.write(&tar.Header{Typeflag: tar.TypeReg, Name: name, ModTime: t, AccessTime: t, ChangeTime: t, Format: tar.FormatPAX})
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
				return e.write(hdr)
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
	kept, err := keptXattrs(rel, names, get)
	if err != nil {
		return err
	}
	for x, v := range kept {
		if hdr.PAXRecords == nil {
			hdr.PAXRecords = map[string]string{}
		}
		hdr.PAXRecords[paxXattr+x] = v
	}
	if sub != nil {
		return e.dirEntry(sub, rel, st, hdr, kept, hidden)
	}
	if !hidden && st.Mode&unix.S_IFMT == unix.S_IFREG && st.Nlink == 1 && slices.Contains(names, originXattr) {
		li, lst, found, err := e.lowers.lookup(rel)
		if err != nil {
			return err
		}
		if found {
			if same, err := e.sameAsLower(rel, st, kept, li, &lst, file); err != nil || same {
				return err // a copy-up that changed nothing
			}
		}
	}
	if err := e.write(hdr); err != nil {
		return err
	}
	if file != nil && hdr.Size > 0 {
		if e.buf == nil {
			e.buf = make([]byte, 1<<20)
		}
		n, err := io.CopyBuffer(e.tw, io.LimitReader(file, hdr.Size), e.buf)
		if err != nil {
			return fmt.Errorf("copy %s: %w", rel, err)
		}
		if n != hdr.Size {
			return fmt.Errorf("copy %s: file shrank from %d to %d bytes while being read", rel, hdr.Size, n)
		}
	}
	return nil
}

// dirEntry writes the directory sub (header hdr, xattrs kept) and what it
// holds. Over a lower directory it is written with an opaque marker if it
// is opaque, and only as the parent of what is written below it if it has
// the lower one's metadata.
func (e *exporter) dirEntry(sub *dirFD, rel string, st *unix.Stat_t, hdr *tar.Header, kept map[string]string, hidden bool) error {
	opaque := exportOpaque(sub)
	if hidden {
		if err := e.write(hdr); err != nil {
			return err
		}
		return e.dir(sub, true)
	}
	li, lst, found, err := e.lowers.lookup(rel)
	if err != nil {
		return err
	}
	overDir := found && isDir(&lst)
	switch {
	case overDir && opaque:
		// Removed and re-created, renamed onto, or marked opaque: the
		// directory, then its marker (containerd's appliers need the
		// directory first), so that nothing of the lower one shows. An
		// applier writing into a merged tree (containerd's naive one,
		// ours) keeps the lower directory's xattrs that the entry does not
		// set: a whiteout in front drops them.
		if lost, err := e.lowerXattrsLost(rel, li, kept); err != nil {
			return err
		} else if lost {
			parent, base := splitParent(rel)
			if err := e.whiteout(join(parent, whPrefix+base)); err != nil {
				return err
			}
		}
		if err := e.write(hdr); err != nil {
			return err
		}
		if err := e.opaqueMarker(rel); err != nil {
			return err
		}
	case overDir:
		same, err := e.sameAsLower(rel, st, kept, li, &lst, nil)
		if err != nil {
			return err
		}
		if same {
			e.pending = append(e.pending, hdr)
			if err := e.dir(sub, false); err != nil {
				return err
			}
			if n := len(e.pending); n > 0 && e.pending[n-1] == hdr {
				e.pending = e.pending[:n-1] // nothing below it was written
			}
			return nil
		}
		if err := e.write(hdr); err != nil {
			return err
		}
	default:
		if err := e.write(hdr); err != nil {
			return err
		}
	}
	return e.dir(sub, opaque)
}

// keptXattrs reads the xattrs a layer carries (not fuse-overlayfs' own).
func keptXattrs(rel string, names []string, get func(string) ([]byte, error)) (map[string]string, error) {
	kept := map[string]string{}
	for _, x := range names {
		if droppedXattr(x) || strings.HasPrefix(x, "security.fuseoverlayfs") {
			continue
		}
		v, err := get(x)
		if err != nil {
			if ignorableXattrErr(err) || errors.Is(err, unix.ENODATA) {
				continue
			}
			return nil, fmt.Errorf("get xattr %s of %s: %w", x, rel, err)
		}
		kept[x] = string(v)
	}
	return kept, nil
}

// sameAsLower reports whether the upper file rel (stat st, xattrs kept,
// open as upper if a regular file) is the file of layer li (stat lst) the
// lower layers show there, as far as the walking differ looks (continuity
// v0.5.0 fs/path.go sameFile, plus all xattrs, which we carry): type,
// mode, owner, device number, xattrs; for a regular file also size and
// mtime, to the nanosecond unless both are whole seconds (as files from a
// tar are): then the content.
func (e *exporter) sameAsLower(rel string, st *unix.Stat_t, kept map[string]string, li int, lst *unix.Stat_t, upper *os.File) (bool, error) {
	if lst.Mode != st.Mode || lst.Uid != st.Uid || lst.Gid != st.Gid || lst.Rdev != st.Rdev {
		return false, nil
	}
	if !isDir(st) && (lst.Size != st.Size || lst.Mtim != st.Mtim) {
		return false, nil
	}
	lowerKept, err := e.lowerXattrs(rel, li, lst)
	if err != nil || lowerKept == nil || !maps.Equal(kept, lowerKept) {
		return false, err
	}
	if isDir(st) || st.Mtim.Nsec != 0 {
		return true, nil
	}
	return e.sameContent(rel, li, lst, upper)
}

// lowerXattrs reads the xattrs a layer carries of rel in layer li (stat
// lst); nil if it is no longer that file.
func (e *exporter) lowerXattrs(rel string, li int, lst *unix.Stat_t) (map[string]string, error) {
	parent, base := splitParent(rel)
	pd, err := e.lowers.openDir(li, parent)
	if err != nil {
		return nil, err
	}
	defer pd.close()
	in, err := pd.inode(base)
	if err != nil {
		return nil, err
	}
	defer in.close()
	if in.st.Ino != lst.Ino || in.st.Dev != lst.Dev {
		return nil, nil // replaced meanwhile
	}
	names, err := in.listXattrs()
	if err != nil {
		return nil, err
	}
	return keptXattrs(rel, names, in.getXattr)
}

// lowerXattrsLost reports whether the lower directory rel of layer li has
// an xattr the upper one (xattrs kept) lacks.
func (e *exporter) lowerXattrsLost(rel string, li int, kept map[string]string) (bool, error) {
	parent, base := splitParent(rel)
	pd, err := e.lowers.openDir(li, parent)
	if err != nil {
		return false, err
	}
	defer pd.close()
	in, err := pd.inode(base)
	if err != nil {
		return false, err
	}
	defer in.close()
	names, err := in.listXattrs()
	if err != nil {
		return false, err
	}
	lowerKept, err := keptXattrs(rel, names, in.getXattr)
	if err != nil {
		return false, err
	}
	for x := range lowerKept {
		if _, ok := kept[x]; !ok {
			return true, nil
		}
	}
	return false, nil
}

// sameContent compares the upper file with the regular file rel of layer
// li (stat lst), both of lst.Size bytes, without moving upper's offset.
func (e *exporter) sameContent(rel string, li int, lst *unix.Stat_t, upper *os.File) (bool, error) {
	parent, base := splitParent(rel)
	pd, err := e.lowers.openDir(li, parent)
	if err != nil {
		return false, err
	}
	defer pd.close()
	lower, err := pd.openRegular(base)
	if err != nil {
		return false, err
	}
	defer func() { _ = lower.Close() }()
	const chunk = 64 << 10
	a, b := make([]byte, chunk), make([]byte, chunk)
	for off := int64(0); off < lst.Size; off += chunk {
		if err := e.ctx.Err(); err != nil {
			return false, err
		}
		n := min(chunk, int(lst.Size-off))
		if _, err := upper.ReadAt(a[:n], off); err != nil {
			return false, fmt.Errorf("read %s: %w", rel, err)
		}
		if _, err := lower.ReadAt(b[:n], off); err != nil {
			return false, fmt.Errorf("read lower %s: %w", rel, err)
		}
		if !bytes.Equal(a[:n], b[:n]) {
			return false, nil
		}
	}
	return true, nil
}

// splitParent splits rel (not the root) into its parent and last name.
func splitParent(rel string) (string, string) {
	if i := strings.LastIndexByte(rel, '/'); i >= 0 {
		return rel[:i], rel[i+1:]
	}
	return "", rel
}
