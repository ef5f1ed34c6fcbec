package layer

import (
	"fmt"
	"strings"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// whiteout handles an entry named .wh.* in the tar directory dir: an
// opaque marker or a whiteout.
func (w *writer) whiteout(dir, base string) error {
	if base == whOpaqueTar {
		d, err := w.dir(dir)
		if err != nil {
			return err
		}
		if err := w.setOpaque(d); err != nil {
			return err
		}
		return w.dropWhiteoutsIn(d)
	}
	if strings.HasPrefix(base, whMetaPfx) {
		return nil // other AUFS metadata (e.g. .wh..wh.plnk) means nothing here
	}
	name := strings.TrimPrefix(base, whPrefix)
	if name == "" || name == "." || name == ".." {
		return fmt.Errorf("whiteout names no file: %w", errdefs.ErrInvalidArgument)
	}
	// As containerd's extraction does, missing parents are created.
	parent, err := w.dir(dir)
	if err != nil {
		return err
	}
	target := join(parent.rel, name)
	if parent.exists(name) {
		if err := parent.removeAll(name); err != nil {
			return err
		}
		w.removed(target)
	}
	if isOpaque(parent) {
		return nil // hidden anyway, and whiteouts in opaque dirs trip fuse-overlayfs
	}
	if !w.detached {
		if _, _, found, err := w.view.lookup(target); err != nil || !found {
			return err // nothing below to hide
		}
	}
	if w.forms.DeviceWhiteouts {
		if err := parent.mknod(name, unix.S_IFCHR, 0); err != nil {
			return err
		}
	} else if !parent.exists(whPrefix + name) {
		f, err := parent.create(whPrefix + name)
		if err != nil {
			return err
		}
		if err := f.Close(); err != nil {
			return err
		}
	}
	w.rec.whiteout(target)
	w.changed(target)
	return nil
}

// setOpaque marks the directory d opaque. Only the xattr: fuse-overlayfs
// 1.10 shows hidden lower files of an opaque directory that holds any
// whiteout-like entry (its own .wh..wh..opq and .wh..opq markers included)
// once the directory has been listed.
func (w *writer) setOpaque(d *dirFD) error {
	if err := d.setXattrSelf(w.forms.OpaqueXattr, []byte("y")); err != nil {
		return err
	}
	w.rec.opaqued(d.rel)
	w.changed(d.rel)
	return nil
}

// dropWhiteoutsIn removes the whiteouts that are direct children of the
// (now opaque) directory d: they hide nothing more, and fuse-overlayfs
// would show lower files of an opaque directory holding them.
func (w *writer) dropWhiteoutsIn(d *dirFD) error {
	names, err := d.names()
	if err != nil {
		return err
	}
	for _, n := range names {
		hidden, ok := strings.CutPrefix(n, whPrefix)
		if !ok {
			st, exists, err := d.lstat(n)
			if err != nil {
				return err
			}
			if !exists || !isWhiteoutDev(&st) {
				continue
			}
			hidden = n
		}
		if err := d.remove(n); err != nil {
			return err
		}
		w.removed(join(d.rel, hidden))
	}
	return nil
}
