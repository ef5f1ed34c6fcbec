package layer

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/archive"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"
	"github.com/fosnap/fuseoverlayfs/internal/testutil/tartest"
)

// ent is one tar entry of a test layer.
type ent struct {
	name, body, link string
	typ              byte
	mode             int64
	uid, gid         int
	xattrs           map[string]string
	major, minor     int64
	sparse           *sparseCase // a GNU PAX sparse file (sparse_test.go), written raw
}

func dir(name string) ent        { return ent{name: name, typ: tar.TypeDir, mode: 0o755} }
func file(name, body string) ent { return ent{name: name, typ: tar.TypeReg, mode: 0o644, body: body} }
func symlink(name, to string) ent {
	return ent{name: name, typ: tar.TypeSymlink, mode: 0o777, link: to}
}
func hardlink(name, to string) ent  { return ent{name: name, typ: tar.TypeLink, mode: 0o644, link: to} }
func whiteout(dir, name string) ent { return file(filepath.Join(dir, ".wh."+name), "") }
func opaque(dir string) ent         { return file(filepath.Join(dir, ".wh..wh..opq"), "") }

func (e ent) withMode(m int64) ent           { e.mode = m; return e }
func (e ent) owned(uid, gid int) ent         { e.uid, e.gid = uid, gid; return e }
func (e ent) withXattr(k, v string) ent      { e.xattrs = map[string]string{k: v}; return e }
func (e ent) withDev(maj, min int64) ent     { e.major, e.minor = maj, min; return e }
func tarOf(t testing.TB, ents ...ent) []byte { return tarBytes(t, ents) }

// testTime is the time of every entry tartest writes.
var testTime = tartest.ModTime

func tarBytes(t testing.TB, ents []ent) []byte {
	t.Helper()
	b, err := tarBytesErr(ents)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// tarBytesErr writes ents through tartest, the one tar builder of the
// tests: names as given, the format archive/tar picks.
func tarBytesErr(ents []ent) ([]byte, error) {
	l := make(tartest.Layer, 0, len(ents))
	for _, e := range ents {
		l = append(l, e.entry())
	}
	return l.Tar()
}

// entry is e as a tartest entry.
func (e ent) entry() tartest.Entry {
	if e.sparse != nil {
		return tartest.Entry{Path: e.name, Raw: sparseEntry(e.name, *e.sparse)}
	}
	return tartest.Entry{
		Path: e.name, Type: e.typ, Mode: e.mode, UID: e.uid, GID: e.gid,
		Body: []byte(e.body), Link: e.link, Xattrs: e.xattrs,
		Devmajor: e.major, Devminor: e.minor,
		Format: tartest.AnyFormat, Verbatim: true,
	}
}

// applyNative applies the layers one after the other into one directory
// with containerd's own extraction: what the native snapshotter holds.
func applyNative(t *testing.T, layers [][]ent) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "native")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for i, l := range layers {
		if _, err := archive.Apply(context.Background(), dir, bytes.NewReader(tarBytes(t, l))); err != nil {
			t.Fatalf("native apply of layer %d: %v", i, err)
		}
	}
	return dir
}

// stack is a set of layer directories laid out like a snapshotter root.
type stack struct {
	root string
	dirs []string // oldest first
}

func newStack(t *testing.T, n int) *stack {
	t.Helper()
	s := &stack{root: t.TempDir()}
	for i := 1; i <= n; i++ {
		d := filepath.Join(s.root, "snapshots", fmt.Sprint(i), "fs")
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Mkdir(filepath.Join(s.root, "snapshots", fmt.Sprint(i), "work"), 0o700); err != nil {
			t.Fatal(err)
		}
		s.dirs = append(s.dirs, d)
	}
	return s
}

// lowers returns the directories below layer i, newest first.
func (s *stack) lowers(i int) []string {
	var l []string
	for j := i - 1; j >= 0; j-- {
		l = append(l, s.dirs[j])
	}
	return l
}

func (s *stack) state(i int) string { return StateFile(filepath.Dir(s.dirs[i])) }

// applyOurs applies the layers into a stack, each directly into its layer
// directory: sequentially (lowers known) or detached and finished as
// containerd's parallel unpack and our Commit do.
func applyOurs(t *testing.T, layers [][]ent, forms Forms, detached bool) *stack {
	t.Helper()
	s, err := applyOursErr(t, layers, forms, detached)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// mountStack mounts the stack read-only through fuse-overlayfs, as a view
// of the top layer, and returns the mount point; the test unmounts it.
func mountStack(t *testing.T, s *stack) string {
	t.Helper()
	target := filepath.Join(s.root, "mnt")
	if err := os.Mkdir(target, 0o755); err != nil {
		t.Fatal(err)
	}
	unmount, err := mountStackAt(s, target)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := unmount(); err != nil {
			t.Error(err)
		}
	})
	return target
}

// mountStackAt mounts the stack read-only through fuse-overlayfs on the
// existing directory target and returns how to unmount it.
func mountStackAt(s *stack, target string) (func() error, error) {
	lowers := s.lowers(len(s.dirs))
	m := mount.Mount{Type: "fuse3.fuse-overlayfs", Source: "overlay", Options: []string{"lowerdir=" + strings.Join(lowers, ":")}}
	if len(lowers) == 1 {
		// fuse-overlayfs needs two directories for a read-only mount.
		empty := filepath.Join(s.root, "empty")
		if err := os.Mkdir(empty, 0o755); err != nil && !os.IsExist(err) {
			return nil, err
		}
		m.Options = []string{"lowerdir=" + lowers[0] + ":" + empty}
	}
	if err := m.Mount(target); err != nil {
		return nil, fmt.Errorf("mount %v: %w", m.Options, err)
	}
	return func() error {
		if err := mount.UnmountAll(target, 0); err != nil {
			return fmt.Errorf("unmount %s: %w", target, err)
		}
		return nil
	}, nil
}

// layerTree is what tree describes of each entry: type, permission bits,
// owner, content hash, link target, device numbers and the xattrs of all
// but the root (of security.* only security.capability); what
// TestSameTreeAsNative compares too. Link counts and times are left out.
var layerTree = testutil.TreeOpts{
	Fields: testutil.TreeType | testutil.TreePerm | testutil.TreeOwner |
		testutil.TreeContent | testutil.TreeLink | testutil.TreeDev,
	Xattr: func(rel, name string) bool {
		// security.selinux and the like: labels of this host.
		return rel != "." && (!strings.HasPrefix(name, "security.") || name == xattrCapability)
	},
}

// tree describes every entry under root (not following symlinks) as
// layerTree says, so that trees from two extractions can be diffed entry
// by entry with testutil.TreeDiff.
func tree(t *testing.T, root string) map[string]string {
	t.Helper()
	out, err := treeErr(root)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// treeErr is tree returning its error.
func treeErr(root string) (map[string]string, error) {
	return testutil.Tree(root, layerTree)
}
