package layer

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"path"
	"strings"
	"sync/atomic"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/moby/sys/userns"
	"golang.org/x/sys/unix"
)

// Options tell Apply where the layer sits.
type Options struct {
	// Lowers are the layer directories below this one, newest first. Hard
	// links to their files are resolved by copying the file up first.
	Lowers []string
	// Detached means the layer was prepared without a parent but may get
	// one at commit (containerd's parallel unpack): what needs the parents
	// (hard links to their files, the metadata of directories the tar
	// implies but does not list) is recorded in StateFile for Finish.
	Detached bool
	// StateFile is where a detached apply records what Finish must do. It
	// must lie outside the layer directory.
	StateFile string
	// Forms overrides the probed whiteout and opaque forms (tests force the
	// unprivileged ones with it).
	Forms *Forms
}

// writer writes into one layer directory. The lower layers are only read,
// through view.
type writer struct {
	ctx      context.Context
	root     *dirFD      // the layer (view.roots[0])
	view     *layerStack // the layer, then its lowers
	detached bool
	forms    Forms
	cache    dirCache
	rec      records
	buf      []byte

	layerPath  string          // the layer directory, as the snapshotter named it
	opaqueDone map[string]bool // directories whose whiteouts an opaque marker dropped
	relocating bool            // Finish is placing moved entries (see relocate)
	implied    map[string]bool // Finish: the implied directories, by their path at apply time
	looked     []string        // positions rootPath looked at, for the cache
	broken     bool            // Finish failed while moving entries
	followed   []string        // Finish: the layer's symlinks later entries went through
}

// maxLinkMemos bounds the link memos cached; a layer links to few files at
// a time.
const maxLinkMemos = 32

// linkMemo remembers where a hard link target was found: layers link many
// names to one file in a row.
type linkMemo struct {
	name, rdir, base string
	st               unix.Stat_t // the target inode as it is now
	noCaps           bool        // the target inode is known to have no security.capability
}

var inUserNS = userns.RunningInUserNS

// Apply extracts the layer tar r into the layer directory root. Entries can
// never land outside root: names are taken relative to root ("../" and
// absolute names stay inside), and symlinks met on the way are resolved
// inside root and its lower layers.
func Apply(ctx context.Context, root string, r io.Reader, opts Options) error {
	if opts.Detached && opts.StateFile == "" {
		return fmt.Errorf("detached apply needs a state file: %w", errdefs.ErrInvalidArgument)
	}
	w, err := newWriter(ctx, root, opts.Lowers, opts.Forms)
	if err != nil {
		return err
	}
	defer w.close()
	if opts.Detached {
		w.detached, w.rec.detached = true, true
		s, err := readState(opts.StateFile)
		if err != nil {
			return err
		}
		w.rec.load(s)
	}
	tr := newEntryReader(r)
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		hdr, body, err := tr.next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("read layer tar: %w", err)
		}
		err = w.entry(hdr, body)
		w.cache.release()
		if err != nil {
			return fmt.Errorf("apply layer entry %q: %w", hdr.Name, err)
		}
	}
	// Directory times last: creating their entries changed them.
	if err := w.setDirTimes(); err != nil {
		return err
	}
	if opts.Detached {
		return w.rec.state().write(opts.StateFile)
	}
	return nil
}

func newWriter(ctx context.Context, root string, lowers []string, forms *Forms) (*writer, error) {
	view, err := openStack(append([]string{root}, lowers...))
	if err != nil {
		return nil, err
	}
	view.cache()
	w := &writer{ctx: ctx, root: view.roots[0], view: view, cache: newDirCache(), layerPath: root, opaqueDone: map[string]bool{}}
	if forms != nil {
		w.forms = *forms
	} else {
		w.forms = ProbeForms(path.Dir(root))
	}
	return w, nil
}

func (w *writer) close() {
	w.cache.close()
	w.view.close()
}

// changed is called for every position of the layer that was created,
// removed, replaced, whited out or made opaque: resolutions that looked at
// it are forgotten.
func (w *writer) changed(rel string) {
	w.cache.forget(rel)
	w.view.forget(rel)
	delete(w.opaqueDone, rel)
}

// removed is called after rel was removed from the layer.
func (w *writer) removed(rel string) {
	w.rec.removed(rel)
	w.changed(rel)
}

func (w *writer) entry(hdr *tar.Header, r io.Reader) error {
	switch hdr.Typeflag {
	case tar.TypeXGlobalHeader, tar.TypeXHeader, tar.TypeGNULongName, tar.TypeGNULongLink:
		return nil
	}
	if strings.IndexByte(hdr.Name, 0) >= 0 || strings.IndexByte(hdr.Linkname, 0) >= 0 {
		return fmt.Errorf("name contains a NUL byte: %w", errdefs.ErrInvalidArgument)
	}
	if err := refuseEntry(hdr); err != nil {
		return err
	}
	if (hdr.Typeflag == tar.TypeChar || hdr.Typeflag == tar.TypeBlock) && inUserNS() {
		// As containerd does (skipFile, v2.4.2 pkg/archive/tar_unix.go):
		// devices cannot be made in a user namespace.
		log.G(w.ctx).WithField("name", hdr.Name).Debug("skipping device node in a user namespace")
		return nil
	}
	rel := cleanRel(hdr.Name)
	if rel == "" {
		// As containerd's extraction (and so the native snapshotter) does,
		// v2.4.2 pkg/archive/tar.go applyNaive: the layer root keeps the
		// metadata the snapshotter gave it.
		return nil
	}
	dir, base := splitDir(rel)
	if strings.HasPrefix(base, whPrefix) {
		return w.whiteout(dir, base)
	}
	parent, err := w.dir(dir)
	if err != nil {
		return err
	}
	target := join(parent.rel, base)
	if len(target) > maxRel {
		return fmt.Errorf("path %.64q... is longer than %d bytes: %w", target, maxRel, errdefs.ErrInvalidArgument)
	}
	if hdr.Typeflag == tar.TypeLink {
		if done, err := w.fastLink(parent, base, hdr); done || err != nil {
			return err
		}
	}
	replacedWhiteout, keep, err := w.clearName(parent, base, hdr.Typeflag == tar.TypeDir)
	if err != nil {
		return err
	}
	if keep {
		// An existing directory is kept, with the tar's metadata.
		w.rec.listed(target)
		w.rec.wrote(target)
		return w.setMeta(parent, base, hdr)
	}
	w.rec.created(target)
	w.rec.wrote(target)
	w.changed(target)
	return w.create(parent, base, hdr, r, replacedWhiteout)
}

// refuseEntry refuses, before anything in the layer changes, the entries
// containerd's extraction (pkg/archive/tar.go, v2.4.2) cannot apply:
// contiguous files, which its createTarFile does not handle, and hard links
// to a whiteout or opaque marker name, which it never creates as a file
// (ours would copy a lower marker). Entries named .wh.* are whiteouts
// whatever their type, there as here.
func refuseEntry(hdr *tar.Header) error {
	if _, base := splitDir(cleanRel(hdr.Name)); strings.HasPrefix(base, whPrefix) {
		return nil
	}
	switch hdr.Typeflag {
	case tar.TypeCont:
		return fmt.Errorf("contiguous file (tar type '7') is not a layer entry type: %w", errdefs.ErrInvalidArgument)
	case tar.TypeLink:
		if _, tbase := splitDir(cleanRel(hdr.Linkname)); strings.HasPrefix(tbase, whPrefix) {
			return fmt.Errorf("hard link to whiteout name %q: a whiteout is no file: %w", hdr.Linkname, errdefs.ErrInvalidArgument)
		}
	}
	return nil
}

// clearName makes room for a new entry base in parent: it removes what is
// there (a whiteout of either form included) unless both are directories,
// in which case keep is true.
func (w *writer) clearName(parent *dirFD, base string, newDir bool) (replacedWhiteout, keep bool, err error) {
	target := join(parent.rel, base)
	st, exists, err := parent.lstat(base)
	if err != nil {
		return false, false, err
	}
	if exists {
		switch {
		case isWhiteoutDev(&st):
			replacedWhiteout = true
			if err := parent.remove(base); err != nil {
				return false, false, err
			}
		case isDir(&st) && newDir:
			return false, true, nil
		default:
			if err := parent.removeAll(base); err != nil {
				return false, false, err
			}
			w.removed(target)
			// The non-directory hid whatever the lowers have there; the
			// new directory must too.
			replacedWhiteout = !isDir(&st)
		}
	}
	// Only the file form leaves .wh. names in the layer (the tar's own are
	// never created as such).
	if !w.forms.DeviceWhiteouts && parent.exists(whPrefix+base) {
		replacedWhiteout = true
		if err := parent.remove(whPrefix + base); err != nil {
			return false, false, err
		}
	}
	if newDir && !exists && !replacedWhiteout && len(w.view.roots) > 1 {
		// Over a non-directory of the lowers a directory merges nothing
		// (and fuse-overlayfs 1.10 fails to list one over a symlink loop).
		_, st, found, err := w.view.lookup(target)
		if err != nil {
			return false, false, err
		}
		replacedWhiteout = found && !isDir(&st)
	}
	return replacedWhiteout, false, nil
}

// create makes the entry hdr as base in parent, where nothing is.
func (w *writer) create(parent *dirFD, base string, hdr *tar.Header, r io.Reader, replacedWhiteout bool) error {
	switch hdr.Typeflag {
	case tar.TypeDir:
		if err := parent.mkdir(base, 0o700); err != nil {
			return err
		}
		if !replacedWhiteout {
			// Over a lower directory it keeps that one's xattrs (as the
			// directory containerd keeps) before the entry's own.
			if err := w.copyLowerXattrs(parent, base); err != nil {
				return err
			}
			w.rec.madeDir(join(parent.rel, base))
		}
		if replacedWhiteout {
			// Deleted and re-created in this layer: nothing below shows.
			d, err := parent.open(base)
			if err != nil {
				return err
			}
			err = w.setOpaque(d)
			d.close()
			if err != nil {
				return err
			}
		}
		return w.setMeta(parent, base, hdr)
	case tar.TypeReg, tar.TypeRegA, tar.TypeGNUSparse: //nolint:staticcheck // old tars still carry TypeRegA
		return w.writeFile(parent, base, hdr, r)
	case tar.TypeSymlink:
		if err := parent.symlink(hdr.Linkname, base); err != nil {
			return err
		}
		return w.setMeta(parent, base, hdr)
	case tar.TypeLink:
		return w.hardLink(parent, base, hdr)
	case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		mode, dev, err := nodeOf(hdr)
		if err == nil && mode&unix.S_IFMT == unix.S_IFCHR && dev == 0 {
			err = fmt.Errorf("character device 0:0 is how an overlay writes a whiteout: %w", errdefs.ErrInvalidArgument)
		}
		if err != nil {
			return err
		}
		if err := parent.mknod(base, mode, dev); err != nil {
			return err
		}
		return w.setMeta(parent, base, hdr)
	default:
		return fmt.Errorf("unsupported tar entry type %q: %w", hdr.Typeflag, errdefs.ErrNotImplemented)
	}
}

// maxDevMajor and maxDevMinor bound the device numbers Linux stores.
const (
	maxDevMajor = 1 << 12
	maxDevMinor = 1 << 20
)

func nodeOf(hdr *tar.Header) (uint32, int, error) {
	mode := uint32(hdr.Mode & 0o7777)
	switch hdr.Typeflag {
	case tar.TypeChar:
		mode |= unix.S_IFCHR
	case tar.TypeBlock:
		mode |= unix.S_IFBLK
	default:
		mode |= unix.S_IFIFO
	}
	// mknodat(2) takes a 32-bit dev_t that the kernel splits by
	// new_decode_dev (include/linux/kdev_t.h): 12 bits of major, 20 of
	// minor. More would be cut, 4096:0 to 0:0, a whiteout.
	if hdr.Devmajor < 0 || hdr.Devmajor >= maxDevMajor || hdr.Devminor < 0 || hdr.Devminor >= maxDevMinor {
		return 0, 0, fmt.Errorf("device number %d:%d out of range (Linux takes major < %d, minor < %d): %w",
			hdr.Devmajor, hdr.Devminor, maxDevMajor, maxDevMinor, errdefs.ErrInvalidArgument)
	}
	return mode, int(unix.Mkdev(uint32(hdr.Devmajor), uint32(hdr.Devminor))), nil
}

// hardLink links base in parent to the entry's target, copying a lower
// file up first. In a detached apply a target not in this layer is recorded
// for Finish.
func (w *writer) hardLink(parent *dirFD, base string, hdr *tar.Header) error {
	target := join(parent.rel, base)
	src, sbase, st, err := w.linkSource(hdr.Linkname, target)
	if err != nil {
		return err
	}
	if src == nil {
		w.rec.link(Link{Name: target, Target: w.pendingTarget(hdr.Linkname), As: hdr.Linkname, Meta: metaOf(hdr)})
		return nil // made by Finish
	}
	if err := linkAt(src, sbase, parent, base); err != nil {
		return err
	}
	return w.linkMeta(parent, base, &st, hdr)
}

// linkMeta gives the (shared) inode the link entry's metadata, as
// containerd's extraction does. Nothing to do when it has it already (the
// usual case: every name of a file carries the same header), unless it has
// a file capability: containerd's lchown of the link makes the kernel drop
// it, and so does ours.
func (w *writer) linkMeta(parent *dirFD, base string, st *unix.Stat_t, hdr *tar.Header) error {
	ts := entryTimes(hdr)
	m := w.cache.memo(hdr.Linkname)
	if st.Uid == uint32(hdr.Uid) && st.Gid == uint32(hdr.Gid) && st.Mode&0o7777 == uint32(hdr.Mode&0o7777) &&
		st.Mtim == ts[1] && st.Atim == ts[0] && !hasXattrs(hdr) {
		if done, err := w.linkHasNoCaps(parent, base, m); done || err != nil {
			return err
		}
	}
	if err := w.setMeta(parent, base, hdr); err != nil {
		return err
	}
	if m != nil {
		m.st.Uid, m.st.Gid = uint32(hdr.Uid), uint32(hdr.Gid)
		m.st.Mode = m.st.Mode&^0o7777 | uint32(hdr.Mode&0o7777)
		m.st.Atim, m.st.Mtim = ts[0], ts[1]
		m.noCaps = !hasXattrs(hdr)
	}
	return nil
}

// linkHasNoCaps tells (done) that the inode of the link base has no file
// capability, looking once per remembered target.
func (w *writer) linkHasNoCaps(parent *dirFD, base string, m *linkMemo) (bool, error) {
	if m != nil && m.noCaps {
		return true, nil
	}
	capLookups.Add(1)
	in, err := parent.inode(base)
	if err != nil {
		return false, err
	}
	defer in.close()
	caps, err := in.hasXattr(xattrCapability)
	if err != nil || caps {
		return false, err
	}
	if m != nil {
		m.noCaps = true
	}
	return true, nil
}

// capLookups counts linkHasNoCaps' lookups, for tests.
var capLookups atomic.Int64

// xattrCapability holds a file's capabilities (capabilities(7)).
const xattrCapability = "security.capability"

// fastLink makes a hard link entry whose name is free without looking at
// the name first (one syscall for the common case); done is false when the
// name is taken (or a whiteout file could be there) and the entry needs the
// general path.
func (w *writer) fastLink(parent *dirFD, base string, hdr *tar.Header) (bool, error) {
	if !w.forms.DeviceWhiteouts {
		return false, nil
	}
	target := join(parent.rel, base)
	src, sbase, st, err := w.linkSource(hdr.Linkname, target)
	if err != nil || src == nil {
		return false, err
	}
	if err := linkAt(src, sbase, parent, base); err != nil {
		if errors.Is(err, unix.EEXIST) {
			return false, nil
		}
		return false, err
	}
	w.rec.created(target)
	w.rec.wrote(target)
	w.changed(target)
	return true, w.linkMeta(parent, base, &st, hdr)
}

// linkSource returns the directory and name in the layer of the hard link
// target name, copying the file up from a lower layer first. In a detached
// apply a target not in this layer is nil: Finish makes the link.
func (w *writer) linkSource(name, linkRel string) (*dirFD, string, unix.Stat_t, error) {
	var st0 unix.Stat_t
	if m := w.cache.memo(name); m != nil {
		if join(m.rdir, m.base) == linkRel {
			return nil, "", st0, fmt.Errorf("hard link %q points to itself: %w", linkRel, errdefs.ErrInvalidArgument)
		}
		d, err := w.dir(m.rdir)
		return d, m.base, m.st, err
	}
	t := cleanRel(name)
	if t == "" {
		return nil, "", st0, fmt.Errorf("hard link to the layer root: %w", errdefs.ErrInvalidArgument)
	}
	tdir, tbase := splitDir(t)
	w.looked = w.looked[:0]
	rdir, err := w.resolve(w.view, tdir, false)
	// What the memo depends on: every position the resolution looked at
	// (a symlink on the way replaced, removed or shadowed), or the cached
	// entry it came from, and the target itself.
	positions := append([]string{tdir, rdir, join(rdir, tbase)}, w.looked...)
	if err != nil {
		if !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ENOTDIR) {
			return nil, "", st0, err
		}
	} else {
		rt := join(rdir, tbase)
		if rt == linkRel {
			return nil, "", st0, fmt.Errorf("hard link %q points to itself: %w", linkRel, errdefs.ErrInvalidArgument)
		}
		li, st, found, err := w.view.lookup(rt)
		if err != nil {
			return nil, "", st0, err
		}
		if found {
			if isDir(&st) {
				return nil, "", st0, fmt.Errorf("hard link to directory %q: %w", name, errdefs.ErrInvalidArgument)
			}
			d, err := w.dir(rdir)
			if err != nil {
				return nil, "", st0, err
			}
			if li > 0 {
				if err := w.copyUpFrom(li, rt, &st, d, tbase); err != nil {
					return nil, "", st0, fmt.Errorf("copy up hard link target %q: %w", name, err)
				}
			}
			w.cache.putMemo(&linkMemo{name: name, rdir: rdir, base: tbase, st: st}, positions)
			return d, tbase, st, nil
		}
	}
	if w.detached {
		return nil, "", st0, nil
	}
	return nil, "", st0, fmt.Errorf("hard link target %q not found in the layer or below: %w", name, errdefs.ErrNotFound)
}

// pendingTarget names a hard link target that a detached apply does not
// have: resolved through the layer's own symlinks as they are now (as a
// sequential apply would have), the rest left to Finish.
func (w *writer) pendingTarget(name string) string {
	t := cleanRel(name)
	if r, err := w.resolve(w.view, t, true); err == nil {
		return r
	}
	return t
}

// copyLowerXattrs gives base in parent the xattrs of the lowers' directory
// at the same place, if they have one.
func (w *writer) copyLowerXattrs(parent *dirFD, base string) error {
	if len(w.view.roots) < 2 {
		return nil
	}
	rel := join(parent.rel, base)
	li, st, found, err := w.view.lookupUnder(rel)
	if err != nil || !found || !isDir(&st) {
		return err
	}
	src, err := w.view.openDir(li, parent.rel)
	if err != nil {
		return err
	}
	defer src.close()
	s, err := src.inode(base)
	if err != nil {
		return err
	}
	defer s.close()
	d, err := parent.inode(base)
	if err != nil {
		return err
	}
	defer d.close()
	return copyXattrs(s, d, true)
}

// copyUpFrom copies rel of lower layer li (stat st) to base in dst.
func (w *writer) copyUpFrom(li int, rel string, st *unix.Stat_t, dst *dirFD, base string) error {
	sdir, sbase := splitDir(rel)
	src, err := w.view.openDir(li, sdir)
	if err != nil {
		return err
	}
	defer src.close()
	if err := copyUp(w.ctx, src, sbase, st, dst, base); err != nil {
		return err
	}
	w.changed(join(dst.rel, base))
	return nil
}
