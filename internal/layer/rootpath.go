package layer

import (
	"fmt"
	"path"
	"strings"

	"golang.org/x/sys/unix"
)

// rootPath resolves name the way containerd's extraction does (continuity's
// fs.RootPath), so that a layer lands where containerd would put it. Its
// quirk: a relative symlink's target is joined to the path as written so
// far, and ".." in it climbs that text, not the directory the symlink is
// in; the path is rewritten and walked again until no symlink is left. The
// lookups underneath follow the kernel (symlinks in the parents, ".." to the
// real parent), in the merged view s, inside the layer stack only. The
// result is a real path with no symlink on it, which may not exist yet.
func (w *writer) rootPath(s *layerStack, name string) (string, error) {
	r := &rootPather{s: s, real: map[string]string{"/": ""}}
	if w.detached && s == w.view {
		r.onUpperLink = func(rel string) { w.rec.followed = append(w.rec.followed, rel) }
	}
	p := path.Join("/", name)
	for {
		before := r.walked
		np, err := r.walkLinks(p)
		if err != nil {
			return "", fmt.Errorf("resolve %q: %w", name, err)
		}
		if r.walked == before {
			w.looked = append(w.looked, r.looked...)
			return strings.TrimPrefix(path.Join("/", np), "/"), nil
		}
		p = np
	}
}

type rootPather struct {
	s      *layerStack
	walked int
	real   map[string]string // a written directory path -> its real path
	looked []string          // real positions looked at
	// onUpperLink is told of every symlink of the top layer followed.
	onUpperLink func(rel string)
}

// walkLinks follows walkLinks of github.com/containerd/continuity v0.5.0
// (fs/path.go): the parent first, then the
// last component, whose symlink target (if any) is joined as text.
func (r *rootPather) walkLinks(p string) (string, error) {
	dir, file := path.Split(p)
	switch {
	case dir == "":
		np, _, err := r.walkLink(file)
		return np, err
	case file == "":
		if dir == "/" {
			return dir, nil
		}
		return r.walkLinks(dir[:len(dir)-1])
	}
	newdir, err := r.walkLinks(dir)
	if err != nil {
		return "", err
	}
	np, isLink, err := r.walkLink(path.Join(newdir, file))
	if err != nil || !isLink || path.IsAbs(np) {
		return np, err
	}
	return path.Join(newdir, np), nil
}

func (r *rootPather) walkLink(p string) (string, bool, error) {
	if r.walked > maxSymlinkHops {
		return "", false, unix.ELOOP
	}
	p = path.Join("/", p)
	if p == "/" {
		return p, false, nil
	}
	li, rel, st, found, err := r.lstat(p)
	if err != nil || !found || !isSymlink(&st) {
		return p, false, err
	}
	target, err := r.s.readlink(li, rel)
	if err != nil {
		return "", false, err
	}
	r.upperLink(li, rel)
	r.walked++
	return target, true, nil
}

func (r *rootPather) upperLink(li int, rel string) {
	if li == 0 && r.onUpperLink != nil {
		r.onUpperLink(rel)
	}
}

// lstat looks at the written path p as the kernel would: its parent
// resolved through symlinks, its last component not.
func (r *rootPather) lstat(p string) (int, string, unix.Stat_t, bool, error) {
	dir, base := path.Split(p)
	pr, ok, err := r.realDir(path.Clean(dir))
	if err != nil || !ok {
		return 0, "", unix.Stat_t{}, false, err
	}
	rel := join(pr, base)
	r.looked = append(r.looked, rel)
	li, st, found, err := r.s.lookup(rel)
	return li, rel, st, found, err
}

// realDir resolves the written directory path p (kernel rules); ok is
// false where something on the way does not exist.
func (r *rootPather) realDir(p string) (string, bool, error) {
	if rp, ok := r.real[p]; ok {
		return rp, true, nil
	}
	parent, base := path.Split(p)
	pr, ok, err := r.realDir(path.Clean(parent))
	if err != nil || !ok {
		return "", ok, err
	}
	rp, ok, err := r.follow(pr, []string{base}, 0)
	if err == nil && ok {
		r.real[p] = rp
	}
	return rp, ok, err
}

// follow walks comps from the real directory cur as the kernel does.
func (r *rootPather) follow(cur string, comps []string, hops int) (string, bool, error) {
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
		r.looked = append(r.looked, next)
		li, st, found, err := r.s.lookup(next)
		switch {
		case err != nil:
			return "", false, err
		case !found:
			return "", false, nil
		case isDir(&st):
			cur = next
		case isSymlink(&st):
			if hops++; hops > maxKernelHops {
				return "", false, unix.ELOOP
			}
			target, err := r.s.readlink(li, next)
			if err != nil {
				return "", false, err
			}
			r.upperLink(li, next)
			if strings.HasPrefix(target, "/") {
				cur = ""
			}
			comps = append(strings.Split(target, "/"), comps...)
		default:
			return "", false, unix.ENOTDIR
		}
	}
	return cur, true, nil
}

// maxKernelHops is the kernel's MAXSYMLINKS.
const maxKernelHops = 40
