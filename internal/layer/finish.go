package layer

import (
	"context"
	"errors"
	"fmt"
	"path"
	"strings"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// Finish completes a layer applied detached, now that its parents are known:
// lowers are their directories, newest first, or none if the layer stays
// without parent. It copies up the targets of pending hard links and links
// them, gives implied directories the metadata of the lower ones, and, for a
// layer without parent, removes the overlay markers that would hide nothing.
// Every recorded name is resolved again through the layer's handle when it
// is acted on. It can be run again after a failure; the caller removes
// stateFile once the commit is stored.
func Finish(ctx context.Context, root, stateFile string, lowers []string) error {
	s, err := readState(stateFile)
	if err != nil {
		return err
	}
	if s.Broken != "" {
		return fmt.Errorf("an earlier finish of this layer failed half way (%s): %w", s.Broken, errdefs.ErrFailedPrecondition)
	}
	w, err := newWriter(ctx, root, lowers, nil)
	if err != nil {
		return err
	}
	defer w.close()
	if len(lowers) == 0 {
		return w.finishBase(s)
	}
	err = w.finishWithLowers(s)
	if err != nil && w.broken {
		// Moved entries are lost: a retry must not find the layer good.
		s.Broken = err.Error()
		if werr := s.write(stateFile); werr != nil {
			return fmt.Errorf("%w (and recording it failed: %w)", err, werr)
		}
	}
	return err
}

func (w *writer) finishWithLowers(s *state) error {
	w.implied = map[string]bool{}
	for _, d := range s.Implied {
		w.implied[d] = true
	}
	w.followed = s.Followed
	if err := w.checkReplaced(s.Replaced); err != nil {
		return err
	}
	// In the order the layer made them (parents first): a relocation
	// that makes a directory opaque hides what later ones would move.
	for _, d := range s.Implied {
		if err := w.ctx.Err(); err != nil {
			return err
		}
		err := w.finishImplicit(d)
		w.cache.release()
		if err != nil {
			return fmt.Errorf("implied directory %q: %w", d, err)
		}
	}
	if err := w.finishLinks(s.Links); err != nil {
		return err
	}
	for _, d := range s.Listed {
		if err := w.ctx.Err(); err != nil {
			return err
		}
		err := w.finishListed(d)
		w.cache.release()
		if err != nil {
			return fmt.Errorf("directory %q: %w", d, err)
		}
	}
	// As for a snapshot prepared on its parent: the root keeps the owner
	// the image gave it.
	st, err := w.view.roots[1].fstat()
	if err != nil {
		return err
	}
	if err := unix.Fchown(w.root.fd, int(st.Uid), int(st.Gid)); err != nil {
		return fmt.Errorf("chown layer root: %w", err)
	}
	return nil
}

// finishBase drops, from a layer that stays without parent, the whiteouts
// and opaque marks it recorded. Each is looked for exactly where it was
// written, through real directories only.
func (w *writer) finishBase(s *state) error {
	if len(s.Links) > 0 {
		l := s.Links[0]
		return fmt.Errorf("hard link %q: target %q is not in the layer and the layer has no parent: %w", l.Name, l.Target, errdefs.ErrNotFound)
	}
	for _, wh := range s.Whiteouts {
		if err := w.ctx.Err(); err != nil {
			return err
		}
		if err := w.dropWhiteout(wh); err != nil {
			return err
		}
	}
	for _, o := range s.Opaque {
		if err := w.ctx.Err(); err != nil {
			return err
		}
		d, err := openStrict(w.root, o)
		if err != nil {
			if gone(err) {
				continue
			}
			return err
		}
		for _, x := range []string{OpaqueXattrTrusted, OpaqueXattrUser} {
			if err := d.removeXattrSelf(x); err != nil {
				d.close()
				return err
			}
		}
		d.close()
	}
	return nil
}

// gone tells an error that means the recorded path is no longer there as
// recorded.
func gone(err error) bool {
	return errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ELOOP)
}

func (w *writer) dropWhiteout(rel string) error {
	dir, name := splitDir(rel)
	d, err := openStrict(w.root, dir)
	if err != nil {
		if gone(err) {
			return nil
		}
		return err
	}
	defer d.close()
	if st, ok, err := d.lstat(name); err != nil {
		return err
	} else if ok && isWhiteoutDev(&st) {
		if err := d.remove(name); err != nil {
			return err
		}
	}
	if st, ok, err := d.lstat(whPrefix + name); err != nil {
		if errors.Is(err, unix.ENAMETOOLONG) {
			return nil // a name of 252 bytes or more has no .wh. form
		}
		return err
	} else if ok && st.Mode&unix.S_IFMT == unix.S_IFREG && st.Size == 0 {
		return d.remove(whPrefix + name)
	}
	return nil
}

// checkReplaced refuses a layer whose implied directories, later removed,
// replaced or listed by the layer itself, are symlinks in the parents: the
// entries written through them would have gone where the symlink points,
// before the change, and that order is not kept.
func (w *writer) checkReplaced(names []string) error {
	for _, r := range names {
		if err := w.ctx.Err(); err != nil {
			return err
		}
		// The lowers as they are, whatever the layer hides of them now.
		_, st, found, err := w.view.below().lookup(r)
		if err != nil {
			return err
		}
		if found && !isDir(&st) {
			return fmt.Errorf("layer entries were written under %q, which the parent layers have as a non-directory (mode %o), and the layer then replaced it: "+
				"apply this layer with its parent known (max_concurrent_unpacks = 1): %w", r, st.Mode&unix.S_IFMT, errdefs.ErrFailedPrecondition)
		}
	}
	return nil
}

// finishImplicit gives the implied directory name the metadata of the
// lower directory it stands for. Where the lowers have a symlink instead,
// the entries belonged where it points (as a sequential apply would have
// put them): they move there.
func (w *writer) finishImplicit(name string) error {
	rel, err := w.resolve(w.view, name, false)
	if err != nil {
		if gone(err) {
			return nil
		}
		return err
	}
	li, st, found, err := w.view.lookupUnder(rel)
	if err != nil {
		return err
	}
	dir, base := splitDir(rel)
	if !found {
		if err := w.inheritGroup(dir, base); err != nil {
			return err
		}
		if p, err := w.dir(dir); err != nil || !p.exists(base) {
			return err
		}
		_, err = w.dir(rel)
		return err
	}
	switch {
	case isDir(&st):
		parent, err := w.dir(dir)
		if err != nil || !parent.exists(base) {
			return err
		}
		src, err := w.view.openDir(li, dir)
		if err != nil {
			return err
		}
		defer src.close()
		if err := copyMetaAt(src, base, parent, base); err != nil {
			return err
		}
		// Cached for the implied directories below (parents come first):
		// each then resolves in a constant number of operations.
		_, err = w.dir(rel)
		return err
	case isSymlink(&st):
		return w.relocate(rel)
	default:
		return fmt.Errorf("layer entries under %q were applied without the parent layers, which have a non-directory (mode %o) there: %w",
			rel, st.Mode&unix.S_IFMT, errdefs.ErrFailedPrecondition)
	}
}

// finishListed gives a directory the tar listed the lowers' xattrs it does
// not set itself, where the lowers have a directory there.
func (w *writer) finishListed(name string) error {
	rel, err := w.resolve(w.view, name, false)
	if err != nil {
		if gone(err) {
			return nil
		}
		return err
	}
	dir, base := splitDir(rel)
	if base == "" {
		return nil
	}
	parent, err := w.dir(dir)
	if err != nil || !parent.exists(base) {
		return err
	}
	return w.copyLowerXattrs(parent, base)
}

// inheritGroup gives the implied directory base in dir, made before its
// parents were known, what the kernel gives a directory made in a setgid
// directory (as a sequential apply would have): the parent's group.
func (w *writer) inheritGroup(dir, base string) error {
	parent, err := w.dir(dir)
	if err != nil || !parent.exists(base) {
		return err
	}
	pst, err := parent.fstat()
	if err != nil || pst.Mode&unix.S_ISGID == 0 {
		return err
	}
	return parent.lchown(base, -1, int(pst.Gid))
}

// relocatingDir is where relocate parks a directory, beside the layer
// directory (in the snapshot's own directory), where no layer entry and no
// symlink of the lowers can reach it.
const relocatingDir = "relocating"

// relocate moves the layer's directory rel, which the lowers have as a
// symlink, to where that symlink leads, merging it into what is there. It
// first checks that nothing conflicts, so a refusal changes nothing.
func (w *writer) relocate(rel string) error {
	dir, base := splitDir(rel)
	parent, err := w.dir(dir)
	if err != nil {
		return err
	}
	snap, err := openLayerDir(path.Dir(w.layerPath))
	if err != nil {
		return err
	}
	defer snap.close()
	target, err := w.relocationDir(rel)
	if err == nil {
		err = w.checkMovable(rel, target)
	}
	if err != nil {
		return fmt.Errorf("move entries written under %q to where the parent layers' symlink points: %w", rel, err)
	}
	if err := snap.removeAll(relocatingDir); err != nil {
		return err
	}
	if err := snap.mkdir(relocatingDir, 0o700); err != nil {
		return err
	}
	tmp, err := snap.open(relocatingDir)
	if err != nil {
		return err
	}
	defer tmp.close()
	if err := renameAt(parent, base, tmp, "d"); err != nil {
		return err
	}
	w.changed(rel)
	dest, err := w.relocationTarget(target)
	if err == nil {
		err = w.checkMerge(tmp, "d", dest, rel)
	}
	if err != nil {
		// Put it back: the layer is as it was.
		if rerr := renameAt(tmp, "d", parent, base); rerr == nil {
			_ = snap.remove(relocatingDir)
		}
		return fmt.Errorf("move entries written under %q to where the parent layers' symlink points: %w", rel, err)
	}
	if err := w.mergeInto(tmp, "d", dest, rel); err != nil {
		w.broken = true
		_ = snap.removeAll(relocatingDir)
		return fmt.Errorf("move entries written under %q: %w", rel, err)
	}
	return snap.remove(relocatingDir)
}

// relocationDir is where the lowers' symlink at rel leads, as containerd
// would resolve it (the usual case: /lib -> usr/lib). A target below rel,
// or that the lowers have as a non-directory, is refused rather than
// guessed; a missing one is made, as containerd makes missing parents.
func (w *writer) relocationDir(rel string) (string, error) {
	lower := w.view.below()
	target, err := w.rootPath(lower, rel)
	if err != nil {
		return "", fmt.Errorf("%w: %w", err, errdefs.ErrFailedPrecondition)
	}
	if target != "" && under(target, rel) {
		return "", fmt.Errorf("it leads to %q, which lies in it: %w", target, errdefs.ErrFailedPrecondition)
	}
	if _, st, found, err := lower.lookup(target); err != nil {
		return "", err
	} else if found && !isDir(&st) {
		return "", fmt.Errorf("it leads to %q, which the parent layers have as a non-directory: %w", target, errdefs.ErrFailedPrecondition)
	}
	return target, nil
}

// checkMovable refuses a move whose result depends on the order of the
// layer's entries: a symlink of the layer under rel that later entries went
// through (moved, it leads elsewhere), or, moving into an ancestor, an
// entry that takes the name rel is reached by.
func (w *writer) checkMovable(rel, target string) error {
	for _, f := range w.followed {
		if under(f, rel) {
			return fmt.Errorf("later entries went through the layer's symlink %q in it: %w", f, errdefs.ErrFailedPrecondition)
		}
	}
	if target != "" && !under(rel, target) {
		return nil
	}
	rest := strings.TrimPrefix(strings.TrimPrefix(rel, target), "/")
	first, _, _ := strings.Cut(rest, "/")
	d, err := openStrict(w.root, rel)
	if err != nil {
		return err
	}
	defer d.close()
	if d.exists(first) || d.exists(whPrefix+first) {
		return fmt.Errorf("it leads to %q, where the layer's entry %q would replace the way to it: %w", target, join(rel, first), errdefs.ErrFailedPrecondition)
	}
	return nil
}

// relocationTarget resolves rel, now a symlink of the lowers, through the
// merged view; the layer's own symlinks and whiteouts on the way are
// refused (their order against the moved entries is lost).
func (w *writer) relocationTarget(rel string) (*dirFD, error) {
	w.relocating = true
	defer func() { w.relocating = false }()
	d, err := w.dir(rel)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", err, errdefs.ErrFailedPrecondition)
	}
	return d, nil
}

// logical tells the name an entry stands for and whether it is a whiteout.
func logical(d *dirFD, n string) (string, bool) {
	if rest, ok := strings.CutPrefix(n, whPrefix); ok {
		return rest, true
	}
	st, ok, _ := d.lstat(n)
	return n, ok && isWhiteoutDev(&st)
}

// checkMerge refuses a merge of directory name of src into dst where the
// layer wrote the same name on both sides (unless both are directories to
// merge, or both whiteouts): which came last is not known.
func (w *writer) checkMerge(src *dirFD, name string, dst *dirFD, old string) error {
	from, err := src.open(name)
	if err != nil {
		return err
	}
	defer from.close()
	names, err := from.names()
	if err != nil {
		return err
	}
	for _, n := range names {
		if err := w.ctx.Err(); err != nil {
			return err
		}
		ln, wh := logical(from, n)
		dn, ok, err := dst.lstat(ln)
		if err != nil {
			return err
		}
		dwh := ok && isWhiteoutDev(&dn)
		if !ok && dst.exists(whPrefix+ln) {
			ok, dwh = true, true
		}
		switch {
		case !ok:
			if err := w.checkLanding(from, n, join(old, n), join(dst.rel, ln)); err != nil {
				return err
			}
			continue
		case wh && dwh:
			continue
		case !wh && !dwh && isDir(&dn):
			sst, _, err := from.lstat(n)
			if err != nil {
				return err
			}
			if isDir(&sst) {
				into, err := dst.open(ln)
				if err != nil {
					return err
				}
				err = w.checkMerge(from, n, into, join(old, n))
				into.close()
				if err != nil {
					return err
				}
				continue
			}
		}
		return fmt.Errorf("the layer wrote %q both there and through the symlink: %w", join(dst.rel, ln), errdefs.ErrFailedPrecondition)
	}
	return nil
}

// checkLanding refuses to move the implied directory n (old at apply time)
// onto to where the lowers have a symlink: it would have to move again.
func (w *writer) checkLanding(from *dirFD, n, old, to string) error {
	if !w.implied[old] {
		return nil
	}
	if st, _, err := from.lstat(n); err != nil || !isDir(&st) {
		return err
	}
	if _, lst, found, err := w.view.lookupUnder(to); err != nil {
		return err
	} else if found && isSymlink(&lst) {
		return fmt.Errorf("%q lands on %q, a symlink of the parent layers too: %w", old, to, errdefs.ErrFailedPrecondition)
	}
	return nil
}

// mergeInto moves the entries of directory name in src into dst and
// removes name; checkMerge has made sure nothing collides but directories.
// An opaque source makes dst opaque: it hid the lowers' content, which the
// layer's own entries in dst are not. old is where the moved directory was
// at apply time.
func (w *writer) mergeInto(src *dirFD, name string, dst *dirFD, old string) error {
	from, err := src.open(name)
	if err != nil {
		return err
	}
	defer from.close()
	if isOpaque(from) {
		if err := w.setOpaque(dst); err != nil {
			return err
		}
	}
	names, err := from.names()
	if err != nil {
		return err
	}
	for _, n := range names {
		if err := w.ctx.Err(); err != nil {
			return err
		}
		if err := w.mergeEntry(from, n, dst, join(old, n)); err != nil {
			return err
		}
	}
	return src.remove(name)
}

func (w *writer) mergeEntry(from *dirFD, n string, dst *dirFD, old string) error {
	sst, _, err := from.lstat(n)
	if err != nil {
		return err
	}
	dstSt, ok, err := dst.lstat(n)
	if err != nil {
		return err
	}
	to := join(dst.rel, n)
	w.changed(to)
	if ok && isDir(&sst) && isDir(&dstSt) {
		if !w.implied[old] {
			// The tar listed it: its entry's metadata wins over what the
			// destination had.
			if err := copyMetaAt(from, n, dst, n); err != nil {
				return err
			}
		}
		into, err := dst.open(n)
		if err != nil {
			return err
		}
		defer into.close()
		return w.mergeInto(from, n, into, old)
	}
	if !ok {
		if err := w.checkLanding(from, n, old, to); err != nil {
			return err
		}
	}
	if ok {
		// Both whiteouts (checkMerge allows nothing else): one is enough.
		return from.remove(n)
	}
	return renameAt(from, n, dst, n)
}

// finishLinks makes the pending hard links, grouped by target, then gives
// them the metadata of their entries in tar order.
func (w *writer) finishLinks(links []Link) error {
	type group struct {
		target  string
		as      string
		ownCopy bool
		names   []string
	}
	var groups []*group
	byKey := map[string]*group{}
	for _, l := range links {
		if l.Ghost {
			continue
		}
		key := fmt.Sprintf("%t:%s", l.OwnCopy, l.Target)
		g := byKey[key]
		if g == nil {
			g = &group{target: l.Target, as: l.As, ownCopy: l.OwnCopy}
			byKey[key] = g
			groups = append(groups, g)
		}
		g.names = append(g.names, l.Name)
	}
	for _, g := range groups {
		if err := w.ctx.Err(); err != nil {
			return err
		}
		err := w.finishLinkGroup(g.target, g.ownCopy, g.names)
		w.cache.release()
		if err != nil {
			if g.as != "" && cleanRel(g.as) != g.target {
				return fmt.Errorf("hard link %q to %q: %w", g.names[0], g.as, err)
			}
			return fmt.Errorf("hard link %q: %w", g.names[0], err)
		}
	}
	for _, l := range links {
		if err := w.ctx.Err(); err != nil {
			return err
		}
		if l.Ghost {
			err := w.finishGhost(l)
			w.cache.release()
			if err != nil {
				return fmt.Errorf("hard link %q (replaced later) to %q: %w", l.Name, l.As, err)
			}
			continue
		}
		dir, base := splitDir(l.Name)
		parent, err := w.dir(dir)
		if err == nil {
			err = w.setMeta(parent, base, l.Meta.header())
		}
		w.cache.release()
		if err != nil {
			return fmt.Errorf("hard link %q: %w", l.Name, err)
		}
	}
	return nil
}

func (w *writer) finishLinkGroup(target string, ownCopy bool, names []string) error {
	var (
		src   *dirFD
		sbase string
		err   error
	)
	if ownCopy {
		// The layer has something else at the target now: the links share
		// their own copy of the lower file.
		src, sbase, err = w.copyOfLower(target, names[0])
		names = names[1:]
	} else if err = w.checkLinkTarget(target); err == nil {
		src, sbase, _, err = w.linkSource(target, "")
	}
	if err != nil {
		return fmt.Errorf("hard link target %q: %w", target, err)
	}
	for _, n := range names {
		if err := w.ctx.Err(); err != nil {
			return err
		}
		dir, base := splitDir(n)
		parent, err := w.dir(dir)
		if err != nil {
			return fmt.Errorf("hard link %q: %w", n, err)
		}
		if err := parent.removeAll(base); err != nil {
			return err
		}
		w.changed(join(parent.rel, base))
		if err := linkAt(src, sbase, parent, base); err != nil {
			return err
		}
	}
	return nil
}

// finishGhost copies up the target of a link whose name the layer
// replaced later and gives it the link entry's metadata.
func (w *writer) finishGhost(l Link) error {
	if err := w.checkLinkTarget(l.Target); err != nil {
		return err
	}
	src, sbase, _, err := w.linkSource(l.Target, "")
	if err != nil {
		return err
	}
	return w.setMeta(src, sbase, l.Meta.header())
}

// checkLinkTarget refuses a pending link whose target the parents' symlinks
// lead to a place the layer also wrote (or whited out): whether the link
// came before or after that is not known.
func (w *writer) checkLinkTarget(target string) error {
	tdir, tbase := splitDir(target)
	rdir, err := w.resolve(w.view, tdir, false)
	if err != nil || join(rdir, tbase) == target {
		return nil // linkSource says what is wrong, if anything
	}
	d, err := openStrict(w.root, rdir)
	if err != nil {
		return nil
	}
	defer d.close()
	if d.exists(tbase) || d.exists(whPrefix+tbase) || d.exists(whOpaqueTar) || isOpaque(d) {
		return fmt.Errorf("the parent layers' symlinks lead it to %q, which the layer also wrote: apply this layer with its parent known (max_concurrent_unpacks = 1): %w",
			join(rdir, tbase), errdefs.ErrFailedPrecondition)
	}
	return nil
}

// copyOfLower copies the lower layers' file target to the link name and
// returns where it is.
func (w *writer) copyOfLower(target, name string) (*dirFD, string, error) {
	lower := w.view.below()
	tdir, tbase := splitDir(target)
	rdir, err := w.resolve(lower, tdir, false)
	if err != nil {
		if gone(err) && w.layerHas(target) {
			return nil, "", errLinkOrder()
		}
		return nil, "", err
	}
	rt := join(rdir, tbase)
	li, st, found, err := lower.lookup(rt)
	if err != nil {
		return nil, "", err
	}
	if !found || isDir(&st) {
		if w.layerHas(target) {
			return nil, "", errLinkOrder()
		}
		return nil, "", fmt.Errorf("not found in the parent layers: %w", errdefs.ErrNotFound)
	}
	dir, base := splitDir(name)
	parent, err := w.dir(dir)
	if err != nil {
		return nil, "", err
	}
	if err := parent.removeAll(base); err != nil {
		return nil, "", err
	}
	w.changed(join(parent.rel, base))
	if err := w.copyUpFrom(li+1, rt, &st, parent, base); err != nil {
		return nil, "", err
	}
	return parent, base, nil
}

// layerHas tells whether the merged view has the file target now: a link
// the parents' symlinks lead into what the layer itself wrote.
func (w *writer) layerHas(target string) bool {
	tdir, tbase := splitDir(target)
	rdir, err := w.resolve(w.view, tdir, false)
	if err != nil {
		return false
	}
	_, st, found, err := w.view.lookup(join(rdir, tbase))
	return err == nil && found && !isDir(&st)
}

// errLinkOrder refuses a pending link whose target only the layer has, at
// a place the layer changed later: which file it named is not known
// without the parents.
func errLinkOrder() error {
	return fmt.Errorf("the parent layers do not have it, the layer has a file there but changed the way to it after the link: "+
		"apply this layer with its parent known (max_concurrent_unpacks = 1): %w", errdefs.ErrFailedPrecondition)
}
