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
		if w.opaqueDone[d.rel] {
			return nil // a repeated marker: nothing new to drop
		}
		if err := w.setOpaque(d); err != nil {
			return err
		}
		if err := w.dropWhiteoutsIn(d); err != nil {
			return err
		}
		if len(w.view.roots) > 1 {
			// What copy-ups brought into d is lower content, which the
			// marker hides: as containerd, remove it.
			if err := w.dropCopiedUp(d); err != nil {
				return err
			}
		}
		w.opaqueDone[d.rel] = true
		return nil
	}
	if strings.HasPrefix(base, whMetaPfx) {
		return nil // other AUFS metadata (e.g. .wh..wh.plnk) means nothing here
	}
	name := strings.TrimPrefix(base, whPrefix)
	if name == "" || name == "." || name == ".." {
		return fmt.Errorf("whiteout names no file: %w", errdefs.ErrInvalidArgument)
	}
	// As containerd's extraction does (mkparent, v2.4.2
	// pkg/archive/tar.go), missing parents are created.
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
	// Links made earlier to a lower file there keep their own copy.
	w.rec.detachTargets(target)
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
		if len(whPrefix+name) > unix.NAME_MAX {
			return fmt.Errorf("the whiteout of a name of %d bytes has no .wh. form (at most %d bytes), and this filesystem refuses the device form: %w",
				len(name), unix.NAME_MAX-len(whPrefix), errdefs.ErrNotImplemented)
		}
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
	w.rec.detachTargets(d.rel)
	if d.rel == "" {
		w.view.opaque[0] = true
	}
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

// dropCopiedUp removes from d what no tar entry of this layer made: files
// copied up for hard links and directories copied up on the way, keeping
// the directories that lead to entries the layer wrote.
func (w *writer) dropCopiedUp(d *dirFD) error {
	n := w.rec.names.at(d.rel, false)
	names, err := d.names()
	if err != nil {
		return err
	}
	for _, name := range names {
		var k *node
		if n != nil {
			k = n.kids[name]
		}
		switch {
		case k == nil || !k.holdsWritten():
			if err := d.removeAll(name); err != nil {
				return err
			}
			w.removed(join(d.rel, name))
		case !k.written:
			sub, err := d.open(name)
			if err != nil {
				continue // not a directory: written below cannot be
			}
			err = w.dropCopiedUp(sub)
			sub.close()
			if err != nil {
				return err
			}
		}
	}
	return nil
}
