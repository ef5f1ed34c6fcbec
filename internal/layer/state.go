package layer

import (
	"archive/tar"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path"
	"sort"
	"strings"
	"time"

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

	dropped bool // its name was replaced or removed later in the layer
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

// state is what a detached apply leaves for Finish, as stored between
// Apply and Commit. It holds names only: Finish resolves each again.
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
	s := &state{}
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

// records is what an apply remembers by path while it runs: the times of
// directories (set at the end), and in a detached apply what Finish needs.
// Paths sit in trees, so that removing a path forgets everything recorded
// at or below it in time proportional to what it forgets: a layer's cost
// stays linear in its entries.
type records struct {
	detached bool
	names    node // by real path in the layer
	targets  node // pending links by their target's tar name
	links    []*Link
}

type node struct {
	kids map[string]*node

	times    *[2]unix.Timespec // a directory's times, set at the end
	implicit bool              // a directory the tar implied
	whiteout bool              // a whiteout written here
	opaque   bool              // marked opaque
	links    []*Link           // pending links named here (names tree) or targeting here (targets tree)
}

// at returns the node of rel, made if create.
func (n *node) at(rel string, create bool) *node {
	for _, c := range splitRel(rel) {
		k := n.kids[c]
		if k == nil {
			if !create {
				return nil
			}
			if n.kids == nil {
				n.kids = map[string]*node{}
			}
			k = &node{}
			n.kids[c] = k
		}
		n = k
	}
	return n
}

// cut detaches the subtree of rel ("" is not cut) and returns it.
func (n *node) cut(rel string) *node {
	dir, base := splitDir(rel)
	p := n.at(dir, false)
	if p == nil || base == "" {
		return nil
	}
	k := p.kids[base]
	delete(p.kids, base)
	return k
}

// walk calls fn for n (at rel) and every node below it, parents first and
// children in name order.
func (n *node) walk(rel string, fn func(string, *node)) {
	fn(rel, n)
	names := make([]string, 0, len(n.kids))
	for c := range n.kids {
		names = append(names, c)
	}
	sort.Strings(names)
	for _, c := range names {
		n.kids[c].walk(join(rel, c), fn)
	}
}

func (r *records) load(s *state) {
	for i := range s.Links {
		r.link(s.Links[i])
	}
	for d := range s.Implicit {
		r.names.at(d, true).implicit = true
	}
	for _, w := range s.Whiteouts {
		r.names.at(w, true).whiteout = true
	}
	for _, o := range s.Opaque {
		r.names.at(o, true).opaque = true
	}
}

func (r *records) state() *state {
	s := &state{}
	for _, l := range r.links {
		if !l.dropped {
			s.Links = append(s.Links, *l)
		}
	}
	r.names.walk("", func(rel string, n *node) {
		if n.implicit {
			if s.Implicit == nil {
				s.Implicit = map[string]bool{}
			}
			s.Implicit[rel] = true
		}
		if n.whiteout {
			s.Whiteouts = append(s.Whiteouts, rel)
		}
		if n.opaque {
			s.Opaque = append(s.Opaque, rel)
		}
	})
	return s
}

// link records a pending hard link.
func (r *records) link(l Link) {
	p := &l
	r.links = append(r.links, p)
	n := r.names.at(l.Name, true)
	n.links = append(n.links, p)
	if !l.Detached {
		t := r.targets.at(l.Target, true)
		t.links = append(t.links, p)
	}
}

// removed forgets everything recorded at or below rel, which is gone.
func (r *records) removed(rel string) {
	if sub := r.names.cut(rel); sub != nil {
		sub.walk(rel, func(_ string, n *node) {
			for _, l := range n.links {
				l.dropped = true
			}
		})
	}
	r.detachTargets(rel)
}

// created notes a new entry at rel: links pending under that name are
// replaced by it, and links to a lower file there must keep their own copy.
func (r *records) created(rel string) {
	if n := r.names.at(rel, false); n != nil {
		for _, l := range n.links {
			l.dropped = true
		}
		n.links = nil
		n.whiteout = false
	}
	r.detachTargets(rel)
}

func (r *records) detachTargets(rel string) {
	if !r.detached {
		return
	}
	if sub := r.targets.cut(rel); sub != nil {
		sub.walk(rel, func(_ string, n *node) {
			for _, l := range n.links {
				l.Detached = true
			}
		})
	}
}

func (r *records) implied(rel string) {
	if r.detached {
		r.names.at(rel, true).implicit = true
	}
}

// listed notes that the tar lists the directory rel itself.
func (r *records) listed(rel string) {
	if n := r.names.at(rel, false); n != nil {
		n.implicit = false
	}
}

func (r *records) whiteout(rel string) {
	if r.detached {
		r.names.at(rel, true).whiteout = true
	}
}

func (r *records) opaqued(rel string) {
	if r.detached {
		r.names.at(rel, true).opaque = true
	}
}

func (r *records) dirTimes(rel string, ts [2]unix.Timespec) {
	r.names.at(rel, true).times = &ts
}
