package layer

import (
	"fmt"
	"strings"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// maxSymlinkHops bounds symlink expansion while resolving a path (as the
// kernel's MAXSYMLINKS).
const maxSymlinkHops = 40

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
	k := &walk{w: w, name: name, comps: splitRel(name), cur: w.root}
	d, err := k.run()
	if err != nil {
		return nil, err
	}
	w.cache.put(name, d, k.traversed)
	return d, nil
}

// walk is one resolution of a name by dir. It holds one open directory at
// a time.
type walk struct {
	w         *writer
	name      string
	comps     []string
	cur       *dirFD // where the walk is, in the layer (owned unless root)
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
			err = k.up()
		default:
			err = k.step(c)
		}
		if err != nil {
			k.setCur(k.w.root)
			return nil, err
		}
	}
	return k.cur, nil
}

func (k *walk) setCur(d *dirFD) {
	if k.cur != k.w.root && k.cur != d {
		k.cur.close()
	}
	k.cur = d
}

// up moves to the parent (a symlink's target may say ".."): it is a real
// directory of the layer, reopened from the root.
func (k *walk) up() error {
	parent, _ := splitDir(k.cur.rel)
	if k.cur.rel == "" || parent == "" {
		k.setCur(k.w.root)
		return nil
	}
	d, err := openStrict(k.w.root, parent)
	if err != nil {
		return err
	}
	k.setCur(d)
	return nil
}

// step moves into the component c of the current directory.
func (k *walk) step(c string) error {
	next := join(k.cur.rel, c)
	if len(next) > maxRel {
		return fmt.Errorf("path %.64q... is longer than %d bytes: %w", next, maxRel, errdefs.ErrInvalidArgument)
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
	return k.makeDir(c, whitedOut)
}

// follow continues the walk at a symlink's target: from the layer's root
// when it is absolute, else from the directory holding the symlink.
func (k *walk) follow(target string) error {
	if k.hops++; k.hops > maxSymlinkHops {
		return fmt.Errorf("resolve %q: %w", k.name, unix.ELOOP)
	}
	if strings.HasPrefix(target, "/") {
		k.setCur(k.w.root)
	}
	k.comps = append(splitRel(strings.Trim(target, "/")), k.comps...)
	return nil
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
	if err := k.cur.mkdir(c, 0o755); err != nil {
		return err
	}
	k.w.changed(next)
	d, err := k.cur.open(c)
	if err != nil {
		return err
	}
	k.setCur(d)
	if whitedOut {
		// Deleted below and re-created here: nothing below shows.
		return k.w.setOpaque(d)
	}
	k.w.rec.implied(next)
	return nil
}

// resolve resolves name like dir but only looks: it returns the real path
// name stands for in the merged view s, or an error (ENOENT, ENOTDIR,
// ELOOP) naming where it stopped.
func (w *writer) resolve(s *layerStack, name string) (string, error) {
	if s == w.view {
		if d := w.cache.get(name); d != nil {
			return d.rel, nil
		}
	}
	cur := ""
	comps := splitRel(name)
	hops := 0
	for len(comps) > 0 {
		c := comps[0]
		comps = comps[1:]
		switch c {
		case "", ".":
			continue
		case "..":
			cur, _ = splitDir(cur)
			continue
		}
		next := join(cur, c)
		li, st, found, err := s.lookup(next)
		switch {
		case err != nil:
			return "", err
		case !found:
			return "", fmt.Errorf("resolve %s: %w", next, unix.ENOENT)
		case isDir(&st):
			cur = next
		case isSymlink(&st):
			if hops++; hops > maxSymlinkHops {
				return "", fmt.Errorf("resolve %q: %w", name, unix.ELOOP)
			}
			target, err := s.readlink(li, next)
			if err != nil {
				return "", err
			}
			if strings.HasPrefix(target, "/") {
				cur = ""
			}
			comps = append(splitRel(strings.Trim(target, "/")), comps...)
		default:
			return "", fmt.Errorf("resolve %s: %w", next, unix.ENOTDIR)
		}
	}
	return cur, nil
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

// dirCache remembers resolved directory names with their handles. Each
// entry lists the positions its resolution looked at; a change at any
// position (created, removed, replaced, whited out, made opaque) forgets
// every entry that looked at it, and so every entry whose resolution
// passed through or below it (a walk reaches a path only through its
// parents).
type dirCache struct {
	byName  map[string]*dirFD
	byPos   map[string][]string
	retired []*dirFD
}

const maxCached = 512

func newDirCache() dirCache {
	return dirCache{byName: map[string]*dirFD{}, byPos: map[string][]string{}}
}

func (c *dirCache) get(name string) *dirFD { return c.byName[name] }

func (c *dirCache) put(name string, d *dirFD, traversed []string) {
	if len(c.byName) >= maxCached {
		c.clear()
	}
	c.byName[name] = d
	for _, p := range traversed {
		c.byPos[p] = append(c.byPos[p], name)
	}
}

// forget drops every entry whose resolution looked at pos. Their handles
// are closed at release: the current entry may still use one.
func (c *dirCache) forget(pos string) {
	for _, name := range c.byPos[pos] {
		if d, ok := c.byName[name]; ok {
			c.retired = append(c.retired, d)
			delete(c.byName, name)
		}
	}
	delete(c.byPos, pos)
}

func (c *dirCache) clear() {
	for _, d := range c.byName {
		c.retired = append(c.retired, d)
	}
	clear(c.byName)
	clear(c.byPos)
}

// release closes the handles forgotten since the last call.
func (c *dirCache) release() {
	for _, d := range c.retired {
		d.close()
	}
	c.retired = c.retired[:0]
}

func (c *dirCache) close() {
	c.clear()
	c.release()
}
