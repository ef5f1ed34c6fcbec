package layer

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path"
	"strings"
	"time"

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

// maxSymlinkHops bounds symlink expansion while resolving a path (as the
// kernel's MAXSYMLINKS).
const maxSymlinkHops = 40

type dirTime struct {
	rel          string
	atime, mtime time.Time
}

type applier struct {
	ctx      context.Context
	root     string
	layers   []string // root first, then the lowers
	detached bool
	forms    Forms
	// dirs caches tar directory names already resolved to real directories
	// in root; any removal of a directory clears it.
	dirs     map[string]string
	dirTimes []dirTime
	st       *state
	buf      []byte
}

var inUserNS = userns.RunningInUserNS

// Apply extracts the layer tar r into the layer directory root. Entries can
// never land outside root: names are taken relative to root ("../" and
// absolute names stay inside), and symlinks met on the way are resolved
// inside root and its lower layers.
func Apply(ctx context.Context, root string, r io.Reader, opts Options) error {
	a, err := newApplier(ctx, root, opts.Lowers, opts.Detached, opts.Forms)
	if err != nil {
		return err
	}
	if opts.Detached {
		if opts.StateFile == "" {
			return fmt.Errorf("detached apply needs a state file: %w", errdefs.ErrInvalidArgument)
		}
		if a.st, err = readState(opts.StateFile); err != nil {
			return err
		}
	}
	tr := tar.NewReader(r)
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("read layer tar: %w", err)
		}
		if err := a.entry(hdr, tr); err != nil {
			return fmt.Errorf("apply layer entry %q: %w", hdr.Name, err)
		}
	}
	// Directory times last: creating their entries changed them.
	for i := len(a.dirTimes) - 1; i >= 0; i-- {
		d := a.dirTimes[i]
		if err := setTimes(a.abs(d.rel), d.atime, d.mtime); err != nil && !errors.Is(err, unix.ENOENT) {
			return err
		}
	}
	if a.st != nil {
		return a.st.write(opts.StateFile)
	}
	return nil
}

func newApplier(ctx context.Context, root string, lowers []string, detached bool, forms *Forms) (*applier, error) {
	st, err := os.Lstat(root)
	if err != nil {
		return nil, err
	}
	if !st.IsDir() {
		return nil, fmt.Errorf("layer directory %s is not a directory: %w", root, errdefs.ErrInvalidArgument)
	}
	a := &applier{
		ctx:      ctx,
		root:     root,
		layers:   append([]string{root}, lowers...),
		detached: detached,
		dirs:     map[string]string{},
		buf:      make([]byte, 1<<20),
	}
	if forms != nil {
		a.forms = *forms
	} else {
		a.forms = ProbeForms(path.Dir(root))
	}
	return a, nil
}

func (a *applier) abs(rel string) string {
	if rel == "" {
		return a.root
	}
	return a.root + "/" + rel
}

func (a *applier) entry(hdr *tar.Header, r io.Reader) error {
	switch hdr.Typeflag {
	case tar.TypeXGlobalHeader, tar.TypeXHeader, tar.TypeGNULongName, tar.TypeGNULongLink:
		return nil
	}
	if strings.IndexByte(hdr.Name, 0) >= 0 || strings.IndexByte(hdr.Linkname, 0) >= 0 {
		return fmt.Errorf("name contains a NUL byte: %w", errdefs.ErrInvalidArgument)
	}
	if (hdr.Typeflag == tar.TypeChar || hdr.Typeflag == tar.TypeBlock) && inUserNS() {
		// As containerd does: devices cannot be made in a user namespace.
		log.G(a.ctx).WithField("name", hdr.Name).Debug("skipping device node in a user namespace")
		return nil
	}
	rel := cleanRel(hdr.Name)
	if rel == "" {
		// As containerd's extraction (and so the native snapshotter) does:
		// the layer root keeps the metadata the snapshotter gave it.
		return nil
	}
	dir, base := path.Split(rel)
	dir = strings.TrimSuffix(dir, "/")
	if strings.HasPrefix(base, whPrefix) {
		return a.whiteout(dir, base)
	}
	pdir, err := a.resolveDir(dir, true)
	if err != nil {
		return err
	}
	target := join(pdir, base)
	p := a.abs(target)

	st, exists, err := lstat(p)
	if err != nil {
		return err
	}
	replacedWhiteout := false
	if exists {
		isDir := st.Mode&unix.S_IFMT == unix.S_IFDIR
		switch {
		case isWhiteoutDev(&st):
			replacedWhiteout = true
			if err := os.Remove(p); err != nil {
				return err
			}
		case isDir && hdr.Typeflag == tar.TypeDir:
			// An existing directory is kept, with the tar's metadata.
			if a.st != nil {
				delete(a.st.Implicit, target)
			}
			return a.setMeta(hdr, target, p)
		default:
			if err := os.RemoveAll(p); err != nil {
				return err
			}
			a.removed(target, isDir)
		}
	}
	if !a.forms.DeviceWhiteouts {
		wh := a.abs(join(pdir, whPrefix+base))
		if _, ok, _ := lstat(wh); ok {
			replacedWhiteout = true
			if err := os.Remove(wh); err != nil {
				return err
			}
		}
	}
	if a.st != nil {
		a.st.created(target)
	}
	var linkSrc string
	if hdr.Typeflag == tar.TypeLink {
		if linkSrc, err = a.linkSource(hdr.Linkname, target); err != nil {
			return err
		}
	}

	switch hdr.Typeflag {
	case tar.TypeDir:
		if err := os.Mkdir(p, 0o700); err != nil {
			return err
		}
		if replacedWhiteout {
			// Deleted and re-created in this layer: nothing below shows.
			if err := a.setOpaque(target); err != nil {
				return err
			}
		}
		return a.setMeta(hdr, target, p)
	case tar.TypeReg, tar.TypeRegA, tar.TypeGNUSparse, tar.TypeCont: //nolint:staticcheck // old tars still carry TypeRegA
		return a.writeFile(hdr, p, r)
	case tar.TypeSymlink:
		if err := os.Symlink(hdr.Linkname, p); err != nil {
			return err
		}
		return a.setMeta(hdr, target, p)
	case tar.TypeLink:
		if linkSrc == "" {
			a.st.Links = append(a.st.Links, Link{Name: target, Target: cleanRel(hdr.Linkname), Meta: metaOf(hdr)})
			return nil // made by Finish
		}
		if err := os.Link(linkSrc, p); err != nil {
			return err
		}
		// As containerd's extraction does, the link entry's metadata goes
		// to the (shared) inode.
		return a.setMeta(hdr, target, p)
	case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		mode := uint32(hdr.Mode & 0o7777)
		switch hdr.Typeflag {
		case tar.TypeChar:
			mode |= unix.S_IFCHR
		case tar.TypeBlock:
			mode |= unix.S_IFBLK
		default:
			mode |= unix.S_IFIFO
		}
		if hdr.Devmajor < 0 || hdr.Devmajor > math.MaxUint32 || hdr.Devminor < 0 || hdr.Devminor > math.MaxUint32 {
			return fmt.Errorf("device number %d:%d out of range: %w", hdr.Devmajor, hdr.Devminor, errdefs.ErrInvalidArgument)
		}
		dev := int(unix.Mkdev(uint32(hdr.Devmajor), uint32(hdr.Devminor)))
		if err := unix.Mknod(p, mode, dev); err != nil {
			return errno("mknod", p, err)
		}
		return a.setMeta(hdr, target, p)
	default:
		return fmt.Errorf("unsupported tar entry type %q: %w", hdr.Typeflag, errdefs.ErrNotImplemented)
	}
}

// writeFile creates the regular file p with the entry's content and metadata.
func (a *applier) writeFile(hdr *tar.Header, p string, r io.Reader) error {
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	// Hide ReadFrom so the copy uses our buffer.
	if _, err := io.CopyBuffer(struct{ io.Writer }{f}, r, a.buf); err != nil {
		_ = f.Close()
		return fmt.Errorf("write %s: %w", p, err)
	}
	fd := int(f.Fd())
	if err := unix.Fchown(fd, hdr.Uid, hdr.Gid); err != nil {
		_ = f.Close()
		return errno("chown", p, err)
	}
	if err := unix.Fchmod(fd, uint32(hdr.Mode&0o7777)); err != nil {
		_ = f.Close()
		return errno("chmod", p, err)
	}
	if err := a.setXattrs(hdr, p, true); err != nil {
		_ = f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return setTimes(p, latest(hdr.AccessTime, hdr.ModTime), hdr.ModTime)
}

// setMeta gives p (not a regular file) the entry's owner, mode, xattrs and
// times; directory times are set at the end.
func (a *applier) setMeta(hdr *tar.Header, rel, p string) error {
	if err := lchown(p, hdr.Uid, hdr.Gid); err != nil {
		return err
	}
	if err := chmodNoFollow(p, uint32(hdr.Mode&0o7777)); err != nil {
		return err
	}
	if err := a.setXattrs(hdr, p, hdr.Typeflag == tar.TypeDir); err != nil {
		return err
	}
	if hdr.Typeflag == tar.TypeDir {
		a.dirTimes = append(a.dirTimes, dirTime{rel: rel, atime: latest(hdr.AccessTime, hdr.ModTime), mtime: hdr.ModTime})
		return nil
	}
	return setTimes(p, latest(hdr.AccessTime, hdr.ModTime), hdr.ModTime)
}

// chmodNoFollow sets p's permission bits unless p is a symlink, whose mode
// means nothing. It must not go by the tar entry's type: a hard-link entry
// can name a symlink, and chmod through that would change the symlink's
// target, which may be anything on the host (a layer once turned / into
// 0644 that way).
func chmodNoFollow(p string, mode uint32) error {
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		return errno("lstat", p, err)
	}
	if st.Mode&unix.S_IFMT == unix.S_IFLNK {
		return nil
	}
	if err := unix.Fchmodat(unix.AT_FDCWD, p, mode, 0); err != nil {
		return errno("chmod", p, err)
	}
	return nil
}

const paxXattr = "SCHILY.xattr."

// setXattrs sets the entry's xattrs on p, leaving out, as containerd does,
// trusted.* ones (they could also fake overlay markers) and those the
// filesystem refuses or that user.* cannot have on p (regOrDir false).
func (a *applier) setXattrs(hdr *tar.Header, p string, regOrDir bool) error {
	for k, v := range hdr.PAXRecords {
		name, ok := strings.CutPrefix(k, paxXattr)
		if !ok {
			continue
		}
		if strings.HasPrefix(name, "trusted.") {
			log.G(a.ctx).WithField("xattr", name).WithField("path", p).Debug("ignoring trusted xattr from layer")
			continue
		}
		if err := unix.Lsetxattr(p, name, []byte(v), 0); err != nil {
			if errors.Is(err, unix.ENOTSUP) || (errors.Is(err, unix.EPERM) && !regOrDir && strings.HasPrefix(name, "user.")) {
				log.G(a.ctx).WithError(err).WithField("xattr", name).WithField("path", p).Debug("ignoring xattr")
				continue
			}
			return errno("lsetxattr "+name, p, err)
		}
	}
	return nil
}

func lchown(p string, uid, gid int) error {
	if err := unix.Lchown(p, uid, gid); err != nil {
		return errno("lchown", p, err)
	}
	return nil
}

func latest(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

func setTimes(p string, atime, mtime time.Time) error {
	ts := []unix.Timespec{toTimespec(atime), toTimespec(mtime)}
	if err := unix.UtimesNanoAt(unix.AT_FDCWD, p, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return errno("utimes", p, err)
	}
	return nil
}

func toTimespec(t time.Time) unix.Timespec {
	if t.IsZero() || t.Before(time.Unix(0, 0)) {
		return unix.Timespec{}
	}
	return unix.NsecToTimespec(t.UnixNano())
}

// setOpaque marks the directory rel opaque. Only the xattr: fuse-overlayfs
// 1.10 shows hidden lower files of an opaque directory that holds any
// whiteout-like entry (its own .wh..wh..opq and .wh..opq markers included)
// once the directory has been listed.
func (a *applier) setOpaque(rel string) error {
	p := a.abs(rel)
	if err := unix.Lsetxattr(p, a.forms.OpaqueXattr, []byte("y"), 0); err != nil {
		return errno("lsetxattr "+a.forms.OpaqueXattr, p, err)
	}
	if a.st != nil {
		a.st.Opaque = append(a.st.Opaque, rel)
	}
	return nil
}

// whiteout handles an entry named .wh.*: an opaque marker or a whiteout.
func (a *applier) whiteout(dir, base string) error {
	if base == whOpaqueTar {
		pdir, err := a.resolveDir(dir, true)
		if err != nil {
			return err
		}
		if err := a.setOpaque(pdir); err != nil {
			return err
		}
		return a.dropWhiteoutsIn(pdir)
	}
	if strings.HasPrefix(base, whMetaPfx) {
		return nil // other AUFS metadata (e.g. .wh..wh.plnk) means nothing here
	}
	name := strings.TrimPrefix(base, whPrefix)
	if name == "" || name == "." || name == ".." {
		return fmt.Errorf("whiteout names no file: %w", errdefs.ErrInvalidArgument)
	}
	// As containerd's extraction does, missing parents are created.
	pdir, err := a.resolveDir(dir, true)
	if err != nil {
		return err
	}
	target := join(pdir, name)
	p := a.abs(target)
	st, exists, err := lstat(p)
	if err != nil {
		return err
	}
	if exists {
		if err := os.RemoveAll(p); err != nil {
			return err
		}
		a.removed(target, st.Mode&unix.S_IFMT == unix.S_IFDIR)
	}
	if isOpaque(a.abs(pdir)) {
		return nil // hidden anyway, and whiteouts in opaque dirs trip fuse-overlayfs
	}
	if !a.detached {
		if _, _, found, err := mergedLookup(a.layers, target); err != nil || !found {
			return err // nothing below to hide
		}
	}
	if a.forms.DeviceWhiteouts {
		if err := unix.Mknod(p, unix.S_IFCHR, 0); err != nil {
			return errno("mknod whiteout", p, err)
		}
	} else {
		wh := a.abs(join(pdir, whPrefix+name))
		if err := os.WriteFile(wh, nil, 0o600); err != nil {
			return err
		}
	}
	if a.st != nil {
		a.st.Whiteouts = append(a.st.Whiteouts, target)
	}
	return nil
}

// dropWhiteoutsIn removes the whiteouts that are direct children of the
// (now opaque) directory rel: they hide nothing more, and fuse-overlayfs
// would show lower files of an opaque directory holding them.
func (a *applier) dropWhiteoutsIn(rel string) error {
	p := a.abs(rel)
	entries, err := os.ReadDir(p)
	if err != nil {
		return err
	}
	for _, e := range entries {
		cp := p + "/" + e.Name()
		if strings.HasPrefix(e.Name(), whPrefix) {
			if err := os.Remove(cp); err != nil {
				return err
			}
			continue
		}
		if e.Type()&os.ModeCharDevice != 0 {
			if st, ok, _ := lstat(cp); ok && isWhiteoutDev(&st) {
				if err := os.Remove(cp); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// removed is called after rel was removed from the layer.
func (a *applier) removed(rel string, wasDir bool) {
	if wasDir {
		clear(a.dirs)
	}
	if a.st != nil {
		a.st.removed(rel)
	}
}

// linkSource returns the real path in root of the hard link target name,
// copying the file up from a lower layer first. In a detached apply a target
// not in this layer is recorded for Finish and "" returned.
func (a *applier) linkSource(name, linkRel string) (string, error) {
	t := cleanRel(name)
	if t == "" {
		return "", fmt.Errorf("hard link to the layer root: %w", errdefs.ErrInvalidArgument)
	}
	tdir, tbase := path.Split(t)
	tdir = strings.TrimSuffix(tdir, "/")
	tp, err := a.resolveDir(tdir, false)
	if err == nil {
		rt := join(tp, tbase)
		if rt == linkRel {
			return "", fmt.Errorf("hard link %q points to itself: %w", linkRel, errdefs.ErrInvalidArgument)
		}
		li, st, found, err := mergedLookup(a.layers, rt)
		if err != nil {
			return "", err
		}
		if found {
			if st.Mode&unix.S_IFMT == unix.S_IFDIR {
				return "", fmt.Errorf("hard link to directory %q: %w", name, errdefs.ErrInvalidArgument)
			}
			if li > 0 {
				up, err := a.resolveDir(tp, true)
				if err != nil {
					return "", err
				}
				rt = join(up, tbase)
				if err := copyUp(a.layers[li]+"/"+rt, &st, a.abs(rt)); err != nil {
					return "", fmt.Errorf("copy up hard link target %q: %w", name, err)
				}
			}
			return a.abs(rt), nil
		}
	} else if !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ENOTDIR) {
		return "", err
	}
	if a.detached {
		return "", nil
	}
	return "", fmt.Errorf("hard link target %q not found in the layer or below: %w", name, errdefs.ErrNotFound)
}

// resolveDir resolves the directory rel (a cleaned name from the tar) in
// the merged view of the layer and its lowers, following symlinks inside the
// layer root, and returns the real relative path. With create, every
// directory on the way is made real in the layer: copied up (owner, mode,
// xattrs) from the lower that has it, or created 0755 (as containerd does for
// missing parents), opaque if it replaces a whiteout of this layer.
func (a *applier) resolveDir(rel string, create bool) (string, error) {
	if rel == "" {
		return "", nil
	}
	if create {
		if r, ok := a.dirs[rel]; ok {
			return r, nil
		}
	}
	comps := splitRel(rel)
	cur := ""
	hops := 0
	// follow continues the walk at the target of the symlink at link,
	// from the layer's root when the target is absolute.
	follow := func(link string) error {
		if hops++; hops > maxSymlinkHops {
			return errno("resolve", rel, unix.ELOOP)
		}
		target, err := os.Readlink(link)
		if err != nil {
			return err
		}
		if strings.HasPrefix(target, "/") {
			cur = ""
		}
		comps = append(splitRel(strings.Trim(target, "/")), comps...)
		return nil
	}
	for len(comps) > 0 {
		c := comps[0]
		comps = comps[1:]
		switch c {
		case "", ".":
			continue
		case "..":
			cur = parentRel(cur)
			continue
		}
		next := join(cur, c)
		up := a.abs(next)
		st, ok, err := lstat(up)
		if err != nil {
			return "", err
		}
		whitedOut := ok && isWhiteoutDev(&st)
		if ok && !whitedOut {
			switch st.Mode & unix.S_IFMT {
			case unix.S_IFDIR:
				cur = next
				continue
			case unix.S_IFLNK:
				if err := follow(up); err != nil {
					return "", err
				}
				continue
			default:
				return "", errno("resolve", next, unix.ENOTDIR)
			}
		}
		var (
			li    int
			lst   unix.Stat_t
			found bool
		)
		if !whitedOut && len(a.layers) > 1 {
			if li, lst, found, err = mergedLookup(a.layers, next); err != nil {
				return "", err
			}
		}
		if found && li > 0 {
			lp := a.layers[li] + "/" + next
			switch lst.Mode & unix.S_IFMT {
			case unix.S_IFDIR:
				if create {
					if err := os.Mkdir(up, 0o700); err != nil {
						return "", err
					}
					if err := copyMeta(lp, &lst, up); err != nil {
						return "", err
					}
				}
				cur = next
				continue
			case unix.S_IFLNK:
				if err := follow(lp); err != nil {
					return "", err
				}
				continue
			default:
				return "", errno("resolve", next, unix.ENOTDIR)
			}
		}
		if !create {
			return "", errno("resolve", next, unix.ENOENT)
		}
		if whitedOut {
			if err := os.Remove(up); err != nil {
				return "", err
			}
		}
		if !whitedOut && (!a.forms.DeviceWhiteouts) {
			wh := a.abs(join(cur, whPrefix+c))
			if _, ok, _ := lstat(wh); ok {
				whitedOut = true
				if err := os.Remove(wh); err != nil {
					return "", err
				}
			}
		}
		if err := os.Mkdir(up, 0o755); err != nil {
			return "", err
		}
		if whitedOut {
			if err := a.setOpaque(next); err != nil {
				return "", err
			}
		}
		if a.st != nil {
			a.st.created(next)
			if !whitedOut {
				a.st.Implicit[next] = true
			}
		}
		cur = next
	}
	if create {
		a.dirs[rel] = cur
	}
	return cur, nil
}

func parentRel(rel string) string {
	i := strings.LastIndexByte(rel, '/')
	if i < 0 {
		return ""
	}
	return rel[:i]
}
