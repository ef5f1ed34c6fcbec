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
	hdr := e.header(rel, st)
	if !entryType(hdr, st) {
		return nil // sockets are not carried, as containerd's differ does
	}
	if first, ok := e.hardLink(rel, st); ok {
		hdr.Typeflag = tar.TypeLink
		hdr.Linkname = first
		return e.write(hdr)
	}
	src, err := openEntry(d, name, hdr)
	if err != nil {
		return err
	}
	defer src.close()
	names, kept, err := src.xattrs(rel)
	if err != nil {
		return err
	}
	for x, v := range kept {
		if hdr.PAXRecords == nil {
			hdr.PAXRecords = map[string]string{}
		}
		hdr.PAXRecords[paxXattr+x] = v
	}
	if src.sub != nil {
		return e.dirEntry(src.sub, rel, st, hdr, kept, hidden)
	}
	if !hidden && hdr.Typeflag == tar.TypeReg && st.Nlink == 1 && slices.Contains(names, originXattr) {
		if same, err := e.unchangedCopyUp(rel, st, kept, src.file); err != nil || same {
			return err
		}
	}
	return e.writeFile(rel, hdr, src.file)
}

// header is the tar header of the upper file rel (stat st) before its
// type is known: name, mode, owner and the mtime capped at the epoch.
func (e *exporter) header(rel string, st *unix.Stat_t) *tar.Header {
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
	return hdr
}

// entryType sets hdr's type (and a device's numbers, a directory's
// trailing slash) from st; false for a socket, which a layer does not carry.
func entryType(hdr *tar.Header, st *unix.Stat_t) bool {
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		hdr.Typeflag = tar.TypeDir
		hdr.Name += "/"
	case unix.S_IFREG:
		hdr.Typeflag = tar.TypeReg
	case unix.S_IFLNK:
		hdr.Typeflag = tar.TypeSymlink
	case unix.S_IFCHR:
		hdr.Typeflag = tar.TypeChar
	case unix.S_IFBLK:
		hdr.Typeflag = tar.TypeBlock
	case unix.S_IFIFO:
		hdr.Typeflag = tar.TypeFifo
	default:
		return false
	}
	if hdr.Typeflag == tar.TypeChar || hdr.Typeflag == tar.TypeBlock || hdr.Typeflag == tar.TypeFifo {
		hdr.Devmajor = int64(unix.Major(st.Rdev))
		hdr.Devminor = int64(unix.Minor(st.Rdev))
	}
	return true
}

// hardLink returns the tar name already written for the regular file rel
// (stat st) when it is a further name of a multiply-linked inode; else it
// records rel as that inode's first name.
func (e *exporter) hardLink(rel string, st *unix.Stat_t) (string, bool) {
	if st.Mode&unix.S_IFMT != unix.S_IFREG || st.Nlink <= 1 {
		return "", false
	}
	key := [2]uint64{st.Dev, st.Ino}
	if first, ok := e.links[key]; ok {
		return first, true
	}
	e.links[key] = rel
	return "", false
}

// entrySource is what entry opened of one upper file, by its type: a
// directory as sub, a regular file as file, anything else as in. Exactly
// one is set.
type entrySource struct {
	sub  *dirFD
	file *os.File
	in   *inodeFD
}

// openEntry opens the file name of d for the entry hdr (its type set),
// and completes hdr with what needs the open file: a regular file's size
// (read from the descriptor, not the name), a symlink's target.
func openEntry(d *dirFD, name string, hdr *tar.Header) (*entrySource, error) {
	switch hdr.Typeflag {
	case tar.TypeDir:
		sub, err := d.open(name)
		if err != nil {
			return nil, err
		}
		return &entrySource{sub: sub}, nil
	case tar.TypeReg:
		file, err := d.openRegular(name)
		if err != nil {
			return nil, err
		}
		var fst unix.Stat_t
		if err := unix.Fstat(int(file.Fd()), &fst); err != nil {
			_ = file.Close()
			return nil, d.err("fstat", name, err)
		}
		hdr.Size = fst.Size
		return &entrySource{file: file}, nil
	case tar.TypeSymlink:
		target, err := d.readlink(name)
		if err != nil {
			return nil, err
		}
		hdr.Linkname = target
	}
	in, err := d.inode(name)
	if err != nil {
		return nil, err
	}
	return &entrySource{in: in}, nil
}

func (s *entrySource) close() {
	switch {
	case s.sub != nil:
		s.sub.close()
	case s.file != nil:
		_ = s.file.Close()
	case s.in != nil:
		s.in.close()
	}
}

// xattrs lists the xattrs of the upper file rel (names) and reads those a
// layer carries (kept).
func (s *entrySource) xattrs(rel string) (names []string, kept map[string]string, err error) {
	var get func(string) ([]byte, error)
	switch {
	case s.sub != nil:
		fd := s.sub.fd
		names, err = listXattrsWith(func(b []byte) (int, error) { return unix.Flistxattr(fd, b) })
		get = s.sub.getXattrSelf
	case s.file != nil:
		fd := int(s.file.Fd())
		names, err = listXattrsWith(func(b []byte) (int, error) { return unix.Flistxattr(fd, b) })
		get = func(x string) ([]byte, error) {
			return getXattrWith(func(b []byte) (int, error) { return unix.Fgetxattr(fd, x, b) })
		}
	default:
		names, err = s.in.listXattrs()
		get = s.in.getXattr
	}
	if err != nil {
		return nil, nil, fmt.Errorf("list xattrs of %s: %w", rel, err)
	}
	kept, err = keptXattrs(rel, names, get)
	return names, kept, err
}

// unchangedCopyUp reports whether the regular file rel (stat st, xattrs
// kept, open as upper) is a copy-up that changed nothing of the file the
// lower layers show there.
func (e *exporter) unchangedCopyUp(rel string, st *unix.Stat_t, kept map[string]string, upper *os.File) (bool, error) {
	li, lst, found, err := e.lowers.lookup(rel)
	if err != nil || !found {
		return false, err
	}
	return e.sameAsLower(rel, st, kept, li, &lst, upper)
}

// writeFile writes hdr and, for a regular file (open as file), its data.
func (e *exporter) writeFile(rel string, hdr *tar.Header, file *os.File) error {
	if err := e.write(hdr); err != nil {
		return err
	}
	if file == nil || hdr.Size == 0 {
		return nil
	}
	if e.buf == nil {
		e.buf = make([]byte, exportChunk)
	}
	if err := exportData(e.ctx, e.tw, file, hdr.Size, e.buf); err != nil {
		return fmt.Errorf("copy %s: %w", rel, err)
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
