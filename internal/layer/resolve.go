package layer

import (
	"errors"
	"fmt"
	"os"
	"path"
	"strings"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// maxSymlinkHops bounds symlink expansion while resolving a path (as
// containerd's fs.RootPath).
const maxSymlinkHops = 255

// dir resolves the directory name (a cleaned name from the tar, or a real
// path) in the merged view of the layer and its lowers, following symlinks
// inside the layer stack only, and returns a handle on it in the layer.
// Every directory on the way is made real in the layer: copied up (owner,
// mode, xattrs, times) from the lower that has it, or created 0755 (as
// containerd does for missing parents), opaque if it replaces a whiteout.
// The handle belongs to the resolution cache: it stays valid until the
// current entry is done (see dirCache.release).
func (w *writer) dir(name string) (*dirFD, error) {
	if name == "" {
		return w.root, nil
	}
	if d := w.cache.get(name); d != nil {
		return d, nil
	}
	if !w.relocating {
		if d, ok, err := w.dirBelow(name); ok || err != nil {
			return d, err
		}
	}
	real := name
	w.looked = w.looked[:0]
	if !w.relocating {
		// Where containerd would put it; the walk then only meets
		// directories, or nothing (to create).
		var err error
		if real, err = w.rootPath(w.view, name); err != nil {
			return nil, err
		}
	}
	k := &walk{w: w, name: name, comps: splitRel(real), cur: w.root}
	d, err := k.run()
	if err != nil {
		return nil, err
	}
	if d != w.root {
		w.cache.put(name, d, append(k.traversed, w.looked...))
	}
	return d, nil
}

// dirBelow resolves name one component below its parent when the parent
// resolves to itself (no symlink on its path, the usual case): the parent's
// handle is cached, so a directory costs a constant number of operations
// whatever its depth. ok is false where the last component is a symlink
// (of the layer or the lowers): the general walk follows it.
func (w *writer) dirBelow(name string) (*dirFD, bool, error) {
	parent, c := splitDir(name)
	if c == "" || c == "." || c == ".." {
		return nil, false, nil
	}
	p, err := w.dir(parent)
	if err != nil {
		return nil, false, err
	}
	if p.rel != parent {
		return nil, false, nil
	}
	k := &walk{w: w, name: name, cur: p, borrowed: p, straight: true}
	if err := k.step(c); err != nil {
		k.setCur(w.root)
		if errors.Is(err, errSymlinkOnPath) {
			return nil, false, nil
		}
		return nil, false, err
	}
	// The parent's entry stands for every position above: forgetting it
	// forgets this one (dirCache.forget).
	w.cache.put(name, k.cur, []string{parent, name})
	return k.cur, true, nil
}

// errSymlinkOnPath stops a walk by dirBelow at a symlink.
var errSymlinkOnPath = errors.New("symlink on the path")

// walk is one resolution of a name by dir. It holds one open directory at
// a time.
type walk struct {
	w         *writer
	name      string
	comps     []string
	cur       *dirFD // where the walk is, in the layer (owned unless root or borrowed)
	borrowed  *dirFD // a cached handle the walk started from (not closed)
	straight  bool   // a symlink ends the walk (errSymlinkOnPath)
	stale     bool   // cur.rel is right but cur.fd is not opened yet (after "..")
	hops      int
	traversed []string // every position looked at: what invalidates it
}

func (k *walk) run() (*dirFD, error) {
	for len(k.comps) > 0 {
		c := k.comps[0]
		k.comps = k.comps[1:]
		var err error
		switch c {
		case "", ".":
			continue
		case "..":
			k.up()
			continue
		default:
			err = k.step(c)
		}
		if err != nil {
			k.setCur(k.w.root)
			return nil, err
		}
	}
	if err := k.open(); err != nil {
		k.setCur(k.w.root)
		return nil, err
	}
	return k.cur, nil
}

func (k *walk) setCur(d *dirFD) {
	if k.cur != k.w.root && k.cur != k.borrowed && k.cur != d {
		k.cur.close()
	}
	k.cur, k.stale = d, false
}

// up moves to the parent (a symlink's target may climb). The parent is a
// real directory of the layer; it is opened only when needed, so that a
// long climb costs one reopen, not one per "..".
func (k *walk) up() {
	if k.cur.rel == "" {
		return
	}
	parent, _ := splitDir(k.cur.rel)
	if parent == "" {
		k.setCur(k.w.root)
		return
	}
	k.setCur(&dirFD{fd: -1, rel: parent})
	k.stale = true
}

// open opens a directory that up only named, from the root.
func (k *walk) open() error {
	if !k.stale {
		return nil
	}
	d, err := openStrict(k.w.root, k.cur.rel)
	if err != nil {
		return err
	}
	k.setCur(d)
	return nil
}

// step moves into the component c of the current directory.
func (k *walk) step(c string) error {
	if err := k.open(); err != nil {
		return err
	}
	next := join(k.cur.rel, c)
	if err := checkDirName(next, c); err != nil {
		return err
	}
	k.traversed = append(k.traversed, next)
	st, ok, err := k.cur.lstat(c)
	if err != nil {
		return err
	}
	if ok && !isWhiteoutDev(&st) {
		switch {
		case isDir(&st):
			d, err := k.cur.open(c)
			if err != nil {
				return err
			}
			k.setCur(d)
			return nil
		case isSymlink(&st):
			if k.straight {
				return errSymlinkOnPath
			}
			if k.w.relocating {
				return fmt.Errorf("resolve %s: %w", next, errReplacedOnPath)
			}
			target, err := k.cur.readlink(c)
			if err != nil {
				return err
			}
			return k.follow(target)
		default:
			return k.cur.err("resolve", c, unix.ENOTDIR)
		}
	}
	// Either whiteout form, whatever this writer writes: Finish does not
	// know the forms its Apply used.
	whitedOut := ok || k.cur.exists(whPrefix+c)
	if !whitedOut {
		li, lst, found, err := k.w.view.lookup(next)
		if err != nil {
			return err
		}
		if found {
			switch {
			case isDir(&lst):
				return k.copyUpDir(c, li)
			case isSymlink(&lst):
				if k.straight {
					return errSymlinkOnPath
				}
				target, err := k.w.view.readlink(li, next)
				if err != nil {
					return err
				}
				return k.follow(target)
			default:
				return k.cur.err("resolve", c, unix.ENOTDIR)
			}
		}
	}
	if whitedOut && k.w.relocating {
		return fmt.Errorf("resolve %s: %w", next, errRemovedOnPath)
	}
	return k.makeDir(c, whitedOut)
}

// checkDirName refuses a directory on an entry's path that fuse-overlayfs
// would read as an overlay marker (".wh.NAME" hides NAME), and paths longer
// than any other tool could use.
func checkDirName(next, c string) error {
	if strings.HasPrefix(c, whPrefix) {
		return fmt.Errorf("directory %q on the path is named like a whiteout: %w", next, errdefs.ErrInvalidArgument)
	}
	if len(next) > maxRel {
		return fmt.Errorf("path %.64q... is longer than %d bytes: %w", next, maxRel, errdefs.ErrInvalidArgument)
	}
	return nil
}

// follow continues the walk at a symlink's target: from the layer's root
// when it is absolute, else from the directory holding the symlink. As
// containerd's fs.RootPath does, the target and the rest of the name are
// joined and cleaned first: ".." drops the component before it by name.
func (k *walk) follow(target string) error {
	if k.hops++; k.hops > maxSymlinkHops {
		return fmt.Errorf("resolve %q: %w", k.name, unix.ELOOP)
	}
	if strings.HasPrefix(target, "/") {
		k.setCur(k.w.root)
	}
	k.comps = expand(target, k.comps)
	return nil
}

// expand joins a symlink's target with the components left to walk and
// cleans the result: what is left are leading ".." and plain names.
func expand(target string, rest []string) []string {
	p := strings.TrimPrefix(target, "/")
	if len(rest) > 0 {
		p += "/" + strings.Join(rest, "/")
	}
	p = path.Clean(p)
	if p == "." {
		return nil
	}
	return strings.Split(p, "/")
}

// copyUpDir makes the lower directory c real in the layer.
func (k *walk) copyUpDir(c string, li int) error {
	next := join(k.cur.rel, c)
	src, err := k.w.view.openDir(li, k.cur.rel)
	if err != nil {
		return err
	}
	defer src.close()
	if err := k.cur.mkdir(c, 0o700); err != nil {
		return err
	}
	if err := copyMetaAt(src, c, k.cur, c); err != nil {
		return err
	}
	k.w.changed(next)
	d, err := k.cur.open(c)
	if err != nil {
		return err
	}
	k.setCur(d)
	return nil
}

// makeDir creates the missing directory c, as containerd's extraction
// does for parents a tar implies.
func (k *walk) makeDir(c string, whitedOut bool) error {
	next := join(k.cur.rel, c)
	if whitedOut {
		if err := k.cur.remove(c); err != nil {
			return err
		}
		if err := k.cur.remove(whPrefix + c); err != nil {
			return err
		}
	}
	if k.w.rec.pendingAt(next) {
		// The link may be a symlink of the parents (a hard link to one);
		// what lies below its name is not known before Finish.
		return fmt.Errorf("entries under %q, a hard link to a file of the parent layers not known yet: apply this layer with its parent known (max_concurrent_unpacks = 1): %w",
			next, errdefs.ErrFailedPrecondition)
	}
	if err := k.cur.mkdir(c, 0o755); err != nil {
		return err
	}
	k.w.changed(next)
	d, err := k.cur.open(c)
	if err != nil {
		return err
	}
	k.setCur(d)
	// Not what a setgid parent would pass on: 0755, as containerd makes it.
	if err := unix.Fchmod(d.fd, 0o755); err != nil {
		return &os.PathError{Op: "chmod", Path: next, Err: err}
	}
	if whitedOut {
		// Deleted below and re-created here: nothing below shows.
		return k.w.setOpaque(d)
	}
	k.w.rec.implied(next)
	return nil
}

// resolve resolves name like dir but only looks: it returns the real path
// name stands for in the merged view s (where containerd would put it), or
// an error (ENOENT, ENOTDIR, ELOOP) naming where it stopped. With partial,
// a path that does not exist (yet) is fine: a detached apply resolves what
// it can see, its own symlinks, and leaves the rest to Finish.
func (w *writer) resolve(s *layerStack, name string, partial bool) (string, error) {
	if s == w.view {
		if d := w.cache.get(name); d != nil {
			return d.rel, nil
		}
		if real, ok, err := w.resolveBelow(name, partial); ok || err != nil {
			return real, err
		}
	}
	real, err := w.rootPath(s, name)
	if err != nil || partial {
		return real, err
	}
	if real != "" {
		if _, st, found, err := s.lookup(real); err != nil {
			return "", err
		} else if !found {
			return "", fmt.Errorf("resolve %s: %w", real, unix.ENOENT)
		} else if !isDir(&st) {
			return "", fmt.Errorf("resolve %s: %w", real, unix.ENOTDIR)
		}
	}
	return real, nil
}

// resolveBelow is resolve where the parent is cached and resolves to
// itself: name resolves to itself unless it is a symlink (one lookup,
// whatever the depth). ok is false where rootPath must do it.
func (w *writer) resolveBelow(name string, partial bool) (string, bool, error) {
	parent, c := splitDir(name)
	if c == "" || c == "." || c == ".." {
		return "", false, nil
	}
	if parent != "" {
		if p := w.cache.get(parent); p == nil || p.rel != parent {
			return "", false, nil
		}
	}
	_, st, found, err := w.view.lookup(name)
	switch {
	case err != nil:
		return "", true, err
	case found && isSymlink(&st):
		return "", false, nil
	}
	// What the result depends on, for a link memo (linkSource).
	w.looked = append(w.looked, parent, name)
	switch {
	case partial:
	case !found:
		return "", true, fmt.Errorf("resolve %s: %w", name, unix.ENOENT)
	case !isDir(&st):
		return "", true, fmt.Errorf("resolve %s: %w", name, unix.ENOTDIR)
	}
	return name, true, nil
}

// readlink reads the symlink rel of layer li.
func (s *layerStack) readlink(li int, rel string) (string, error) {
	dir, base := splitDir(rel)
	d, err := s.openDir(li, dir)
	if err != nil {
		return "", err
	}
	defer d.close()
	return d.readlink(base)
}

// What a relocation (Finish moving entries written through a name the
// parents have as a symlink) cannot place, because the layer also changed
// the destination and a parallel unpack does not know in which order.
var (
	errRemovedOnPath  = errors.New("the layer whited out a directory on the way")
	errReplacedOnPath = errors.New("the layer replaced a directory on the way by a symlink")
)

// dirCache remembers resolved directory names with their handles, and
// where hard link targets were found (linkMemo). Each entry lists the
// positions its resolution looked at; a change at any position (created,
// removed, replaced, whited out, made opaque) forgets every entry that
// looked at it, and so every entry whose resolution passed through or
// below it (a walk reaches a path only through its parents). An entry
// resolved from its parent's (dirBelow) lists the parent's name as a
// position: forgetting an entry forgets those too.
type dirCache struct {
	byName  map[string]*dirFD
	byPos   map[string][]string
	memos   map[string]*linkMemo
	memoPos map[string][]string
	retired []*dirFD
}

// maxCached bounds the handles cached: more than a chain of directories
// as deep as a path can go (PATH_MAX / 2).
const maxCached = 2560

func newDirCache() dirCache {
	return dirCache{byName: map[string]*dirFD{}, byPos: map[string][]string{},
		memos: map[string]*linkMemo{}, memoPos: map[string][]string{}}
}

func (c *dirCache) get(name string) *dirFD { return c.byName[name] }

func (c *dirCache) put(name string, d *dirFD, traversed []string) {
	c.byName[name] = d
	for _, p := range traversed {
		c.byPos[p] = append(c.byPos[p], name)
	}
}

// memo returns the link memo of the target name, if still right.
func (c *dirCache) memo(name string) *linkMemo { return c.memos[name] }

// putMemo remembers a link memo until a position it depends on changes.
func (c *dirCache) putMemo(m *linkMemo, positions []string) {
	if len(c.memos) >= maxLinkMemos {
		clear(c.memos)
		clear(c.memoPos)
	}
	c.memos[m.name] = m
	for _, p := range positions {
		c.memoPos[p] = append(c.memoPos[p], m.name)
	}
}

// forget drops every entry whose resolution looked at pos. Their handles
// are closed at release: the current entry may still use one.
func (c *dirCache) forget(pos string) {
	if pos == "" {
		// The root changed (made opaque): every resolution looked at it.
		c.clear()
		return
	}
	for _, name := range c.memoPos[pos] {
		delete(c.memos, name)
	}
	delete(c.memoPos, pos)
	names := c.byPos[pos]
	delete(c.byPos, pos)
	for _, name := range names {
		if d, ok := c.byName[name]; ok {
			c.retired = append(c.retired, d)
			delete(c.byName, name)
			c.forget(name)
		}
	}
}

func (c *dirCache) clear() {
	for _, d := range c.byName {
		c.retired = append(c.retired, d)
	}
	clear(c.byName)
	clear(c.byPos)
	clear(c.memos)
	clear(c.memoPos)
}

// release closes the handles forgotten since the last call, and starts
// again when the cache is full: between entries, where no handle is in use
// (an entry's resolution relies on its parents staying cached).
func (c *dirCache) release() {
	if len(c.byName) >= maxCached {
		c.clear()
	}
	for _, d := range c.retired {
		d.close()
	}
	c.retired = c.retired[:0]
}

func (c *dirCache) close() {
	c.clear()
	c.release()
}
