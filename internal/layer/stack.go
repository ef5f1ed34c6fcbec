package layer

import (
	"golang.org/x/sys/unix"
)

// layerStack is a read-only view of layer directories, newest first, merged
// as fuse-overlayfs merges them. It only looks: lookups, and handles on the
// directories that copy-up reads from.
type layerStack struct {
	roots  []*dirFD
	opaque []bool // whether each layer's root is opaque
}

// openStack opens the layer directories dirs (paths the snapshotter built).
func openStack(dirs []string) (*layerStack, error) {
	s := &layerStack{}
	for _, d := range dirs {
		fd, err := openLayerDir(d)
		if err != nil {
			s.close()
			return nil, err
		}
		s.roots = append(s.roots, fd)
		s.opaque = append(s.opaque, isOpaque(fd))
	}
	return s, nil
}

func (s *layerStack) close() {
	for _, r := range s.roots {
		r.close()
	}
}

// below is the view of the layers under the top one (sharing its handles).
func (s *layerStack) below() *layerStack {
	return &layerStack{roots: s.roots[1:], opaque: s.opaque[1:]}
}

type lookupResult int

const (
	lkMissing lookupResult = iota // not in this layer: look below
	lkHidden                      // whited out or under an opaque directory: nothing below shows
	lkFound
)

// lookup finds rel (a real path: cleaned, no symlinks to follow) in the
// merged view, honouring whiteouts and opaque directories. It returns the
// index of the layer holding it and its stat.
func (s *layerStack) lookup(rel string) (int, unix.Stat_t, bool, error) {
	comps := splitRel(rel)
	if len(comps) == 0 || len(s.roots) == 0 {
		return 0, unix.Stat_t{}, false, nil
	}
	for li, root := range s.roots {
		res, st, err := lookupIn(root, s.opaque[li], comps)
		if err != nil {
			return 0, st, false, err
		}
		switch res {
		case lkFound:
			return li, st, true, nil
		case lkHidden:
			return 0, st, false, nil
		}
	}
	return 0, unix.Stat_t{}, false, nil
}

// lookupIn looks comps up in one layer.
func lookupIn(root *dirFD, opaque bool, comps []string) (lookupResult, unix.Stat_t, error) {
	d := root
	defer func() {
		if d != root {
			d.close()
		}
	}()
	for i, c := range comps {
		st, ok, err := d.lstat(c)
		if err != nil {
			return lkMissing, st, err
		}
		if !ok {
			if opaque || d.exists(whPrefix+c) {
				return lkHidden, st, nil
			}
			return lkMissing, st, nil
		}
		if isWhiteoutDev(&st) {
			return lkHidden, st, nil
		}
		if i == len(comps)-1 {
			return lkFound, st, nil
		}
		if !isDir(&st) {
			// A non-directory hides whatever lower layers have below it.
			return lkHidden, st, nil
		}
		next, err := d.open(c)
		if err != nil {
			return lkMissing, st, err
		}
		if d != root {
			d.close()
		}
		d = next
		if isOpaque(d) {
			opaque = true
		}
	}
	return lkMissing, unix.Stat_t{}, nil
}

// openDir opens the directory rel of layer li, every component a real
// directory (nothing followed).
func (s *layerStack) openDir(li int, rel string) (*dirFD, error) {
	return openStrict(s.roots[li], rel)
}

// openStrict walks rel from root, one directory at a time, following
// nothing. The caller closes the result (a new handle even for "").
func openStrict(root *dirFD, rel string) (*dirFD, error) {
	fd, err := unix.Openat(root.fd, ".", dirFlags, 0)
	if err != nil {
		return nil, root.err("open", ".", err)
	}
	d := &dirFD{fd: fd, rel: root.rel}
	for _, c := range splitRel(rel) {
		next, err := d.open(c)
		d.close()
		if err != nil {
			return nil, err
		}
		d = next
	}
	return d, nil
}

// lookupUnder finds rel in the layers below the top one, as they show
// through it: nothing if the top layer hides rel's parent (whited out,
// opaque, a non-directory) whatever the top holds at rel itself.
func (s *layerStack) lookupUnder(rel string) (int, unix.Stat_t, bool, error) {
	hidden, err := s.hiddenByTop(rel)
	if err != nil || hidden {
		return 0, unix.Stat_t{}, false, err
	}
	li, st, found, err := s.below().lookup(rel)
	return li + 1, st, found, err
}

func (s *layerStack) hiddenByTop(rel string) (bool, error) {
	dir, _ := splitDir(rel)
	d := s.roots[0]
	opaque := s.opaque[0]
	defer func() {
		if d != s.roots[0] {
			d.close()
		}
	}()
	for _, c := range splitRel(dir) {
		st, ok, err := d.lstat(c)
		if err != nil {
			return false, err
		}
		if !ok {
			return opaque || d.exists(whPrefix+c), nil
		}
		if !isDir(&st) {
			return true, nil
		}
		next, err := d.open(c)
		if err != nil {
			return false, err
		}
		if d != s.roots[0] {
			d.close()
		}
		d = next
		opaque = opaque || isOpaque(d)
	}
	return opaque, nil
}
