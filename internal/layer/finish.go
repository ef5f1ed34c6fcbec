package layer

import (
	"archive/tar"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path"
	"sort"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// Link is a hard link whose target was not in the layer when it was applied.
type Link struct {
	// Name is the link's real path in the layer.
	Name string `json:"name"`
	// Target is the target's name as in the tar.
	Target string `json:"target"`
	// Detached: the layer replaced or removed the target after linking to
	// it, so the link gets its own copy of the lower file.
	Detached bool `json:"detached,omitempty"`
	// Meta is the link entry's metadata, which goes to the linked inode.
	Meta Meta `json:"meta"`
}

// Meta is the metadata of a tar entry.
type Meta struct {
	Mode   int64             `json:"mode"`
	UID    int               `json:"uid"`
	GID    int               `json:"gid"`
	ATime  int64             `json:"atime"`
	MTime  int64             `json:"mtime"`
	Xattrs map[string]string `json:"xattrs,omitempty"`
}

func metaOf(hdr *tar.Header) Meta {
	m := Meta{Mode: hdr.Mode, UID: hdr.Uid, GID: hdr.Gid, ATime: hdr.AccessTime.UnixNano(), MTime: hdr.ModTime.UnixNano()}
	for k, v := range hdr.PAXRecords {
		if strings.HasPrefix(k, paxXattr) {
			if m.Xattrs == nil {
				m.Xattrs = map[string]string{}
			}
			m.Xattrs[k] = v
		}
	}
	if hdr.AccessTime.IsZero() {
		m.ATime = 0
	}
	return m
}

func (m Meta) header() *tar.Header {
	h := &tar.Header{Typeflag: tar.TypeLink, Mode: m.Mode, Uid: m.UID, Gid: m.GID, ModTime: time.Unix(0, m.MTime), PAXRecords: m.Xattrs}
	if m.ATime != 0 {
		h.AccessTime = time.Unix(0, m.ATime)
	}
	return h
}

// state is what a detached apply leaves for Finish.
type state struct {
	Links []Link `json:"links,omitempty"`
	// Implicit holds directories the layer needed but its tar did not list.
	Implicit map[string]bool `json:"implicit,omitempty"`
	// Whiteouts and Opaque are the overlay markers written, which a layer
	// that ends up without parent does not want.
	Whiteouts []string `json:"whiteouts,omitempty"`
	Opaque    []string `json:"opaque,omitempty"`
}

func readState(file string) (*state, error) {
	s := &state{Implicit: map[string]bool{}}
	data, err := os.ReadFile(file)
	if errors.Is(err, os.ErrNotExist) {
		return s, nil
	}
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(data, s); err != nil {
		return nil, fmt.Errorf("read unpack state %s: %w", file, err)
	}
	if s.Implicit == nil {
		s.Implicit = map[string]bool{}
	}
	return s, nil
}

func (s *state) empty() bool {
	return len(s.Links) == 0 && len(s.Implicit) == 0 && len(s.Whiteouts) == 0 && len(s.Opaque) == 0
}

func (s *state) write(file string) error {
	if s.empty() {
		return nil
	}
	data, err := json.Marshal(s)
	if err != nil {
		return err
	}
	tmp := file + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, file)
}

func under(p, dir string) bool {
	return p == dir || strings.HasPrefix(p, dir+"/")
}

// created notes a new entry at rel.
func (s *state) created(rel string) {
	for i := 0; i < len(s.Links); i++ {
		if s.Links[i].Name == rel {
			s.Links = append(s.Links[:i], s.Links[i+1:]...)
			i--
		} else if s.Links[i].Target == rel {
			s.Links[i].Detached = true
		}
	}
}

// removed notes that rel and everything below it went.
func (s *state) removed(rel string) {
	for i := 0; i < len(s.Links); i++ {
		if under(s.Links[i].Name, rel) {
			s.Links = append(s.Links[:i], s.Links[i+1:]...)
			i--
		} else if under(s.Links[i].Target, rel) {
			s.Links[i].Detached = true
		}
	}
	for d := range s.Implicit {
		if under(d, rel) {
			delete(s.Implicit, d)
		}
	}
}

// StateFile is where a detached apply of the snapshot whose directory is
// snapshotDir records what Finish must do.
func StateFile(snapshotDir string) string {
	return path.Join(snapshotDir, "unpack-state.json")
}

// HasState reports whether a detached apply left work for Finish.
func HasState(stateFile string) bool {
	_, err := os.Lstat(stateFile)
	return err == nil
}

// Finish completes a layer applied detached, now that its parents are known:
// lowers are their directories, newest first, or none if the layer stays
// without parent. It copies up the targets of pending hard links and links
// them, gives implied directories the metadata of the lower ones, and, for a
// layer without parent, removes the overlay markers that would hide nothing.
// It can be run again after a failure; the caller removes stateFile once the
// commit is stored.
func Finish(ctx context.Context, root, stateFile string, lowers []string) error {
	s, err := readState(stateFile)
	if err != nil {
		return err
	}
	if len(lowers) == 0 {
		return finishBase(root, s)
	}
	a, err := newApplier(ctx, root, lowers, false, nil)
	if err != nil {
		return err
	}
	implicit := make([]string, 0, len(s.Implicit))
	for d := range s.Implicit {
		implicit = append(implicit, d)
	}
	sort.Strings(implicit) // parents first
	var moves [][2]string
	remap := func(p string) string {
		for _, m := range moves {
			if under(p, m[0]) {
				p = join(m[1], strings.TrimPrefix(strings.TrimPrefix(p, m[0]), "/"))
			}
		}
		return p
	}
	for _, d := range implicit {
		d = remap(d)
		moved, err := a.finishImplicit(d)
		if err != nil {
			return err
		}
		if moved != d {
			moves = append(moves, [2]string{d, moved})
		}
	}
	for i := range s.Links {
		s.Links[i].Name = remap(s.Links[i].Name)
	}
	if err := a.finishLinks(s.Links); err != nil {
		return err
	}
	// As for a snapshot prepared on its parent: the root keeps the owner
	// the image gave it.
	var st unix.Stat_t
	if err := unix.Lstat(lowers[0], &st); err != nil {
		return errno("lstat", lowers[0], err)
	}
	return lchown(root, int(st.Uid), int(st.Gid))
}

func finishBase(root string, s *state) error {
	if len(s.Links) > 0 {
		l := s.Links[0]
		return fmt.Errorf("hard link %q: target %q is not in the layer and the layer has no parent: %w", l.Name, l.Target, errdefs.ErrNotFound)
	}
	for _, w := range s.Whiteouts {
		p := root + "/" + w
		if st, ok, _ := lstat(p); ok && isWhiteoutDev(&st) {
			if err := os.Remove(p); err != nil {
				return err
			}
		}
		dir, name := path.Split(w)
		wh := root + "/" + dir + whPrefix + name
		if st, ok, _ := lstat(wh); ok && st.Mode&unix.S_IFMT == unix.S_IFREG && st.Size == 0 {
			if err := os.Remove(wh); err != nil {
				return err
			}
		}
	}
	for _, o := range s.Opaque {
		p := root + "/" + o
		for _, x := range []string{OpaqueXattrTrusted, OpaqueXattrUser} {
			if err := unix.Lremovexattr(p, x); err != nil && !errors.Is(err, unix.ENODATA) && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ENOTSUP) {
				return errno("lremovexattr "+x, p, err)
			}
		}
	}
	return nil
}

// finishImplicit gives the implied directory rel the metadata of the lower
// directory it stands for. Where the lowers have a symlink instead, the
// entries belonged where it points (as a sequential apply would have put
// them): they move there. It returns where rel's content now is.
func (a *applier) finishImplicit(rel string) (string, error) {
	p := a.abs(rel)
	if _, ok, err := lstat(p); err != nil || !ok {
		return rel, err
	}
	li, st, found, err := mergedLookup(a.layers[1:], rel)
	if err != nil {
		return rel, err
	}
	switch {
	case !found:
		return rel, nil
	case st.Mode&unix.S_IFMT == unix.S_IFDIR:
		return rel, copyMeta(a.layers[1+li]+"/"+rel, &st, p)
	case st.Mode&unix.S_IFMT == unix.S_IFLNK:
		tmp, err := os.MkdirTemp(a.root, ".relocate-")
		if err != nil {
			return rel, err
		}
		defer func() { _ = os.RemoveAll(tmp) }()
		moved := tmp + "/d"
		if err := os.Rename(p, moved); err != nil {
			return rel, err
		}
		clear(a.dirs)
		dest, err := a.resolveDir(rel, true)
		if err != nil {
			// Put it back so a retry finds the layer as it was.
			_ = os.Rename(moved, p)
			return rel, fmt.Errorf("resolve symlink %q of the parent layers: %w", rel, err)
		}
		return dest, mergeInto(moved, a.abs(dest))
	default:
		return rel, fmt.Errorf("layer entries under %q were applied without the parent layers, which have a non-directory (mode %o) there: %w",
			rel, st.Mode&unix.S_IFMT, errdefs.ErrFailedPrecondition)
	}
}

// mergeInto moves the entries of directory src into directory dst, those of
// src winning, and removes src.
func mergeInto(src, dst string) error {
	entries, err := os.ReadDir(src)
	if err != nil {
		return err
	}
	for _, e := range entries {
		s, d := src+"/"+e.Name(), dst+"/"+e.Name()
		dst, ok, err := lstat(d)
		if err != nil {
			return err
		}
		if ok && e.IsDir() && dst.Mode&unix.S_IFMT == unix.S_IFDIR && !isOpaque(s) {
			if err := mergeInto(s, d); err != nil {
				return err
			}
			continue
		}
		if ok {
			if err := os.RemoveAll(d); err != nil {
				return err
			}
		}
		if err := os.Rename(s, d); err != nil {
			return err
		}
	}
	return os.Remove(src)
}

func (a *applier) finishLinks(links []Link) error {
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
		if err := a.finishLinkGroup(g.target, g.detached, g.names); err != nil {
			return err
		}
	}
	// Metadata in tar order, as the entries would have set it.
	for _, l := range links {
		if err := a.setMeta(l.Meta.header(), l.Name, a.abs(l.Name)); err != nil {
			return err
		}
	}
	return nil
}

func (a *applier) finishLinkGroup(target string, detached bool, names []string) error {
	tdir, tbase := path.Split(target)
	tdir = strings.TrimSuffix(tdir, "/")
	var src string
	if detached {
		// The layer has something else at the target now: the links
		// share their own copy of the lower file.
		lower := &applier{ctx: a.ctx, root: a.layers[1], layers: a.layers[1:], dirs: map[string]string{}}
		tp, err := lower.resolveDir(tdir, false)
		if err != nil {
			return fmt.Errorf("hard link target %q: %w", target, err)
		}
		li, st, found, err := mergedLookup(lower.layers, join(tp, tbase))
		if err != nil {
			return err
		}
		if !found || st.Mode&unix.S_IFMT == unix.S_IFDIR {
			return fmt.Errorf("hard link target %q not found in the parent layers: %w", target, errdefs.ErrNotFound)
		}
		src = a.abs(names[0])
		if err := os.RemoveAll(src); err != nil {
			return err
		}
		if err := copyUp(lower.layers[li]+"/"+join(tp, tbase), &st, src); err != nil {
			return err
		}
		names = names[1:]
	} else {
		var err error
		if src, err = a.linkSource(target, ""); err != nil {
			return err
		}
	}
	for _, n := range names {
		p := a.abs(n)
		if err := os.RemoveAll(p); err != nil {
			return err
		}
		if err := os.Link(src, p); err != nil {
			return err
		}
	}
	return nil
}
