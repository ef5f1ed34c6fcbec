package layer

import (
	"archive/tar"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/fosnap/fuseoverlayfs/internal/layout"
)

// Link is a hard link whose target was not in the layer when it was applied.
type Link struct {
	// Name is the link's real path in the layer.
	Name string `json:"name"`
	// Target is the target's name, resolved through the layer's own
	// symlinks as they were when the link was applied.
	Target string `json:"target"`
	// As is the target as the tar names it, for messages.
	As string `json:"as,omitempty"`
	// OwnCopy: the layer replaced or removed the target after linking to
	// it, so the link gets its own copy of the lower file.
	OwnCopy bool `json:"own_copy,omitempty"`
	// Meta is the link entry's metadata, which goes to the linked inode.
	Meta Meta `json:"meta"`
	// Ghost: the layer replaced or removed the link's name later; the
	// target is still copied up with the entry's metadata, as a
	// sequential apply would have done.
	Ghost bool `json:"ghost,omitempty"`

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
	// Implied holds directories the layer needed but its tar did not list,
	// in the order they were made (Finish keeps the tar's order).
	Implied []string `json:"implied,omitempty"`
	// Whiteouts and Opaque are the overlay markers written, which a layer
	// that ends up without parent does not want.
	Whiteouts []string `json:"whiteouts,omitempty"`
	Opaque    []string `json:"opaque,omitempty"`
	// Replaced holds implied directories the layer later removed, replaced
	// or listed itself: where the parents have a symlink there, what the
	// layer wrote through it cannot be placed without the order of entries.
	Replaced []string `json:"replaced,omitempty"`
	// Listed holds directories the tar listed and the layer made: over a
	// lower directory they keep its xattrs, as containerd keeps them.
	Listed []string `json:"listed,omitempty"`
	// Followed holds the layer's own symlinks that a later entry's path
	// went through: moved by Finish, they would lead elsewhere.
	Followed []string `json:"followed,omitempty"`
	// Broken says why an earlier Finish failed half way: the layer can no
	// longer be finished.
	Broken string `json:"broken,omitempty"`
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
	return len(s.Links) == 0 && len(s.Implied) == 0 && len(s.Whiteouts) == 0 && len(s.Opaque) == 0 && len(s.Replaced) == 0 && len(s.Followed) == 0 && len(s.Listed) == 0
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
	return layout.UnpackState(snapshotDir)
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
	targets  node // pending links by their target's name
	links    []*Link
	replaced []string
	followed []string
	seq      int // of implied directories
}

type orderedName struct {
	seq  int
	name string
}

type node struct {
	kids map[string]*node

	times    *[2]unix.Timespec // a directory's times, set at the end
	implicit int               // a directory the tar implied: its order, from 1
	listed   bool              // a directory the tar listed and the layer made
	whiteout bool              // a whiteout written here
	written  bool              // an entry of the tar made this (not a copy-up)
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
		if s.Links[i].Ghost {
			l := s.Links[i]
			l.dropped = true
			r.links = append(r.links, &l)
			continue
		}
		r.link(s.Links[i])
	}
	for _, d := range s.Implied {
		r.implied(d)
	}
	for _, w := range s.Whiteouts {
		r.names.at(w, true).whiteout = true
	}
	for _, o := range s.Opaque {
		r.names.at(o, true).opaque = true
	}
	for _, d := range s.Listed {
		r.names.at(d, true).listed = true
	}
	r.replaced = append(r.replaced, s.Replaced...)
	r.followed = append(r.followed, s.Followed...)
}

func (r *records) state() *state {
	s := &state{Replaced: r.replaced, Followed: r.followed}
	var implied []orderedName
	for _, l := range r.links {
		if !l.dropped || l.Ghost {
			s.Links = append(s.Links, *l)
		}
	}
	r.names.walk("", func(rel string, n *node) {
		if n.implicit > 0 {
			implied = append(implied, orderedName{n.implicit, rel})
		}
		if n.whiteout {
			s.Whiteouts = append(s.Whiteouts, rel)
		}
		if n.opaque {
			s.Opaque = append(s.Opaque, rel)
		}
		if n.listed {
			s.Listed = append(s.Listed, rel)
		}
	})
	sort.Slice(implied, func(a, b int) bool { return implied[a].seq < implied[b].seq })
	for _, o := range implied {
		s.Implied = append(s.Implied, o.name)
	}
	return s
}

// drop notes that the link's name was replaced or removed.
func (l *Link) drop() {
	l.dropped = true
	l.Ghost = !l.OwnCopy
}

// link records a pending hard link.
func (r *records) link(l Link) {
	p := &l
	r.links = append(r.links, p)
	n := r.names.at(l.Name, true)
	n.links = append(n.links, p)
	if !l.OwnCopy {
		t := r.targets.at(l.Target, true)
		t.links = append(t.links, p)
	}
}

// removed forgets everything recorded at or below rel, which is gone.
func (r *records) removed(rel string) {
	if sub := r.names.cut(rel); sub != nil {
		sub.walk(rel, func(p string, n *node) {
			for _, l := range n.links {
				l.drop()
			}
			if n.implicit > 0 {
				r.replaced = append(r.replaced, p)
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
			l.drop()
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
	sub := r.targets.cut(rel)
	if rel == "" {
		sub, r.targets = &node{kids: r.targets.kids}, node{}
	}
	if sub != nil {
		sub.walk(rel, func(_ string, n *node) {
			for _, l := range n.links {
				l.OwnCopy = true
				l.Ghost = false // the lower file it would copy up is hidden now
			}
		})
	}
}

// pendingAt tells whether a pending hard link is named rel.
func (r *records) pendingAt(rel string) bool {
	n := r.names.at(rel, false)
	if n == nil {
		return false
	}
	for _, l := range n.links {
		if !l.dropped {
			return true
		}
	}
	return false
}

func (r *records) implied(rel string) {
	if r.detached {
		r.seq++
		r.names.at(rel, true).implicit = r.seq
	}
}

// listed notes that the tar lists the directory rel itself.
func (r *records) listed(rel string) {
	if n := r.names.at(rel, false); n != nil && n.implicit > 0 {
		n.implicit = 0
		r.replaced = append(r.replaced, rel)
	}
}

func (r *records) whiteout(rel string) {
	if r.detached {
		r.names.at(rel, true).whiteout = true
	}
}

func (r *records) opaqued(rel string) {
	if !r.detached {
		return
	}
	n := r.names.at(rel, true)
	n.opaque = true
	// Implied directories already below were reached through the lowers
	// before they were hidden: whether a symlink of theirs was followed
	// is not known any more.
	n.walk(rel, func(p string, k *node) {
		if k != n && k.implicit > 0 {
			r.replaced = append(r.replaced, p)
		}
	})
}

// madeDir notes a directory the tar listed and the layer made.
func (r *records) madeDir(rel string) {
	if r.detached {
		r.names.at(rel, true).listed = true
	}
}

// wrote notes that a tar entry made rel.
func (r *records) wrote(rel string) {
	r.names.at(rel, true).written = true
}

// holdsWritten tells whether n or anything below it was made by a tar entry.
func (n *node) holdsWritten() bool {
	if n.written {
		return true
	}
	for _, k := range n.kids {
		if k.holdsWritten() {
			return true
		}
	}
	return false
}

func (r *records) dirTimes(rel string, ts [2]unix.Timespec) {
	r.names.at(rel, true).times = &ts
}
