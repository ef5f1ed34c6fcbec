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
	// dirs, when not nil, caches the merged view's directories with
	// handles on them in each layer, so that a lookup costs a constant
	// whatever its depth. A writer keeps it right: every change of the top
	// layer at a position drops what was cached at and below it (forget).
	dirs *stackDir
	// handles counts the handles dirs holds.
	handles int
	// lower is below(), kept so that its cache lasts (the lowers do not
	// change while a layer is written).
	lower *layerStack
}

// stackDir is a directory of the merged view: the layers that show it,
// newest first, each with a handle on it.
type stackDir struct {
	layers []shownDir
	kids   map[string]*stackDir
}

// shownDir is a layer's directory in a stackDir. The last one shown may be
// opaque (in itself or by an ancestor in its layer): nothing below shows.
type shownDir struct {
	li     int
	d      *dirFD // owned unless it is the layer's root
	opaque bool
}

// maxStackHandles bounds the handles a cached view holds; past it the
// cache starts again.
const maxStackHandles = 4096

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
	s.dropCache()
	if s.lower != nil {
		s.lower.dropCache()
	}
	for _, r := range s.roots {
		r.close()
	}
}

// below is the view of the layers under the top one (sharing its handles).
// A cached view gives a cached one.
func (s *layerStack) below() *layerStack {
	if s.lower != nil {
		return s.lower
	}
	l := &layerStack{roots: s.roots[1:], opaque: s.opaque[1:]}
	if s.dirs != nil {
		l.cache()
		s.lower = l
	}
	return l
}

// cache turns on the directory cache (see layerStack.dirs).
func (s *layerStack) cache() {
	s.dropCache()
	root := &stackDir{}
	for li, r := range s.roots {
		root.layers = append(root.layers, shownDir{li: li, d: r, opaque: s.opaque[li]})
		if s.opaque[li] {
			break
		}
	}
	s.dirs = root
}

// dropCache closes what the cache holds and starts it again (if on).
func (s *layerStack) dropCache() {
	if s.dirs == nil {
		return
	}
	s.dirs.closeAll(s)
	s.dirs = nil
	s.handles = 0
	if s.lower != nil {
		s.lower.dropCache()
		s.lower = nil
	}
}

func (n *stackDir) closeAll(s *layerStack) {
	for _, k := range n.kids {
		k.closeAll(s)
	}
	for _, l := range n.layers {
		if l.d != s.roots[l.li] {
			l.d.close()
		}
	}
}

// forget drops what the cache knows at and below rel, which changed in the
// top layer.
func (s *layerStack) forget(rel string) {
	if s.dirs == nil {
		return
	}
	if rel == "" {
		s.cache()
		return
	}
	dir, base := splitDir(rel)
	p := s.dirs
	for _, c := range splitRel(dir) {
		if p = p.kids[c]; p == nil {
			return
		}
	}
	if k := p.kids[base]; k != nil {
		delete(p.kids, base)
		k.closeAll(s)
	}
}

// shown returns the cached directory rel of the merged view (made as
// needed, parents first): as lookupIn walks each layer, but each
// directory opened once.
func (s *layerStack) shown(rel string) (*stackDir, error) {
	n := s.dirs
	for _, c := range splitRel(rel) {
		k := n.kids[c]
		if k == nil {
			var err error
			if k, err = s.showChild(n, c); err != nil {
				return nil, err
			}
			if n.kids == nil {
				n.kids = map[string]*stackDir{}
			}
			n.kids[c] = k
		}
		n = k
	}
	return n, nil
}

// showChild finds which layers show the directory c of n.
func (s *layerStack) showChild(n *stackDir, c string) (*stackDir, error) {
	k := &stackDir{}
	for _, l := range n.layers {
		st, ok, err := l.d.lstat(c)
		if err != nil {
			k.closeAll(s)
			return nil, err
		}
		if !ok {
			if l.opaque || l.d.exists(whPrefix+c) {
				break
			}
			continue
		}
		if isWhiteoutDev(&st) || !isDir(&st) {
			break // a non-directory hides whatever lower layers have
		}
		d, err := l.d.open(c)
		if err != nil {
			k.closeAll(s)
			return nil, err
		}
		s.handles++
		o := l.opaque || isOpaque(d)
		k.layers = append(k.layers, shownDir{li: l.li, d: d, opaque: o})
		if o {
			break
		}
	}
	return k, nil
}

// lookupCached is lookup through the cache; from skips the layers above
// it (lookupUnder).
func (s *layerStack) lookupCached(rel string, from int) (int, unix.Stat_t, bool, error) {
	if s.handles > maxStackHandles {
		s.cache()
	}
	dir, base := splitDir(rel)
	n, err := s.shown(dir)
	if err != nil {
		return 0, unix.Stat_t{}, false, err
	}
	for _, l := range n.layers {
		if l.li < from {
			continue
		}
		st, ok, err := l.d.lstat(base)
		if err != nil {
			return 0, st, false, err
		}
		if !ok {
			if l.opaque || l.d.exists(whPrefix+base) {
				return 0, st, false, nil
			}
			continue
		}
		if isWhiteoutDev(&st) {
			return 0, st, false, nil
		}
		return l.li, st, true, nil
	}
	return 0, unix.Stat_t{}, false, nil
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
	if s.dirs != nil {
		return s.lookupCached(rel, 0)
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
	if s.dirs != nil && rel != "" {
		// The cached handle, where the merged view shows that layer's
		// directory: the same directory openStrict would reach.
		if n, err := s.shown(rel); err == nil {
			for _, l := range n.layers {
				if l.li == li {
					return l.d.reopen()
				}
			}
		}
	}
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
	if s.dirs != nil {
		if rel == "" {
			return 0, unix.Stat_t{}, false, nil
		}
		return s.lookupCached(rel, 1)
	}
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

// reopen opens a new handle on the directory d.
func (d *dirFD) reopen() (*dirFD, error) {
	countOps(1)
	fd, err := unix.Openat(d.fd, ".", dirFlags, 0)
	if err != nil {
		return nil, d.err("open", ".", err)
	}
	return &dirFD{fd: fd, rel: d.rel}, nil
}
