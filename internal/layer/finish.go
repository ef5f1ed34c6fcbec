package layer

import (
	"context"
	"errors"
	"fmt"
	"sort"

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
	w, err := newWriter(ctx, root, lowers, nil)
	if err != nil {
		return err
	}
	defer w.close()
	if len(lowers) == 0 {
		return w.finishBase(s)
	}
	implicit := make([]string, 0, len(s.Implicit))
	for d := range s.Implicit {
		implicit = append(implicit, d)
	}
	sort.Strings(implicit) // parents first
	for _, d := range implicit {
		err := w.finishImplicit(d)
		w.cache.release()
		if err != nil {
			return fmt.Errorf("implied directory %q: %w", d, err)
		}
	}
	if err := w.finishLinks(s.Links); err != nil {
		return err
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
		if err := w.dropWhiteout(wh); err != nil {
			return err
		}
	}
	for _, o := range s.Opaque {
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
		return err
	} else if ok && st.Mode&unix.S_IFMT == unix.S_IFREG && st.Size == 0 {
		return d.remove(whPrefix + name)
	}
	return nil
}

// finishImplicit gives the implied directory name the metadata of the
// lower directory it stands for. Where the lowers have a symlink instead,
// the entries belonged where it points (as a sequential apply would have
// put them): they move there.
func (w *writer) finishImplicit(name string) error {
	rel, err := w.resolve(w.view, name)
	if err != nil {
		if gone(err) {
			return nil
		}
		return err
	}
	li, st, found, err := w.view.below().lookup(rel)
	if err != nil || !found {
		return err
	}
	dir, base := splitDir(rel)
	switch {
	case isDir(&st):
		parent, err := w.dir(dir)
		if err != nil || !parent.exists(base) {
			return err
		}
		src, err := w.view.openDir(li+1, dir)
		if err != nil {
			return err
		}
		defer src.close()
		return copyMetaAt(src, base, parent, base)
	case isSymlink(&st):
		return w.relocate(rel)
	default:
		return fmt.Errorf("layer entries under %q were applied without the parent layers, which have a non-directory (mode %o) there: %w",
			rel, st.Mode&unix.S_IFMT, errdefs.ErrFailedPrecondition)
	}
}

// relocate moves the layer's directory rel, which the lowers have as a
// symlink, to where that symlink leads, merging it into what is there.
func (w *writer) relocate(rel string) error {
	dir, base := splitDir(rel)
	parent, err := w.dir(dir)
	if err != nil {
		return err
	}
	tmpName, err := w.tempDir()
	if err != nil {
		return err
	}
	tmp, err := w.root.open(tmpName)
	if err != nil {
		return err
	}
	defer func() {
		tmp.close()
		_ = w.root.removeAll(tmpName)
	}()
	if err := renameAt(parent, base, tmp, "d"); err != nil {
		return err
	}
	w.changed(rel)
	dest, err := w.dir(rel)
	if err != nil {
		// Put it back so a retry finds the layer as it was.
		_ = renameAt(tmp, "d", parent, base)
		return fmt.Errorf("resolve symlink %q of the parent layers: %w", rel, err)
	}
	return w.mergeInto(tmp, "d", dest)
}

// tempDir makes a fresh directory in the layer's root and returns its name.
func (w *writer) tempDir() (string, error) {
	for i := 0; ; i++ {
		name := fmt.Sprintf(".relocate-%d", i)
		err := w.root.mkdir(name, 0o700)
		if err == nil {
			return name, nil
		}
		if !errors.Is(err, unix.EEXIST) || i > 1000 {
			return "", err
		}
	}
}

// mergeInto moves the entries of directory name in src into dst, those of
// src winning, and removes name.
func (w *writer) mergeInto(src *dirFD, name string, dst *dirFD) error {
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
		if err := w.mergeEntry(from, n, dst); err != nil {
			return err
		}
	}
	return src.remove(name)
}

func (w *writer) mergeEntry(from *dirFD, n string, dst *dirFD) error {
	sst, _, err := from.lstat(n)
	if err != nil {
		return err
	}
	dstSt, ok, err := dst.lstat(n)
	if err != nil {
		return err
	}
	w.changed(join(dst.rel, n))
	if ok && isDir(&sst) && isDir(&dstSt) {
		sub, err := from.open(n)
		if err != nil {
			return err
		}
		opaque := isOpaque(sub)
		sub.close()
		if !opaque {
			into, err := dst.open(n)
			if err != nil {
				return err
			}
			defer into.close()
			return w.mergeInto(from, n, into)
		}
	}
	if ok {
		if err := dst.removeAll(n); err != nil {
			return err
		}
	}
	return renameAt(from, n, dst, n)
}

// finishLinks makes the pending hard links, grouped by target, then gives
// them the metadata of their entries in tar order.
func (w *writer) finishLinks(links []Link) error {
	type group struct {
		target   string
		detached bool
		names    []string
	}
	var groups []*group
	byKey := map[string]*group{}
	for _, l := range links {
		key := fmt.Sprintf("%t:%s", l.Detached, l.Target)
		g := byKey[key]
		if g == nil {
			g = &group{target: l.Target, detached: l.Detached}
			byKey[key] = g
			groups = append(groups, g)
		}
		g.names = append(g.names, l.Name)
	}
	for _, g := range groups {
		err := w.finishLinkGroup(g.target, g.detached, g.names)
		w.cache.release()
		if err != nil {
			return err
		}
	}
	for _, l := range links {
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

func (w *writer) finishLinkGroup(target string, detached bool, names []string) error {
	var (
		src   *dirFD
		sbase string
		err   error
	)
	if detached {
		// The layer has something else at the target now: the links share
		// their own copy of the lower file.
		src, sbase, err = w.copyOfLower(target, names[0])
		names = names[1:]
	} else {
		src, sbase, _, err = w.linkSource(target, "")
	}
	if err != nil {
		return fmt.Errorf("hard link target %q: %w", target, err)
	}
	for _, n := range names {
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

// copyOfLower copies the lower layers' file target to the link name and
// returns where it is.
func (w *writer) copyOfLower(target, name string) (*dirFD, string, error) {
	lower := w.view.below()
	tdir, tbase := splitDir(target)
	rdir, err := w.resolve(lower, tdir)
	if err != nil {
		return nil, "", err
	}
	rt := join(rdir, tbase)
	li, st, found, err := lower.lookup(rt)
	if err != nil {
		return nil, "", err
	}
	if !found || isDir(&st) {
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
