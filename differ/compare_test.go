package differ

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"io/fs"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/archive"
	"github.com/containerd/containerd/v2/pkg/archive/compression"
	"github.com/containerd/containerd/v2/plugins/diff/walking"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"
	"github.com/fosnap/fuseoverlayfs/internal/testutil/tartest"
)

// owned and withXattr adjust an entry of the property test's base layers.
func owned(e tartest.Entry, id int) tartest.Entry { e.UID, e.GID = id, id; return e }

func withXattr(e tartest.Entry, v string) tartest.Entry {
	e.Xattrs = map[string]string{"user.base": v}
	return e
}

// The parent chain of the property test: a base layer and one that deletes
// and re-creates things in it (whiteouts and an opaque directory below the
// container's upper directory).
var (
	propBase = tartest.Layer{
		tartest.Dir("a", 0o755),
		tartest.File("a/f1", 0o644, "one"),
		withXattr(owned(tartest.File("a/f2", 0o600, "two"), 7), "x"),
		withXattr(tartest.Dir("a/b", 0o750), "d"),
		tartest.File("a/b/g", 0o644, "gee"),
		tartest.Dir("a/b/c", 0o755),
		tartest.File("a/b/c/deep", 0o644, "deep"),
		tartest.Symlink("a/ln", "f1"),
		// Mode 0: containerd's applier chmods the link's target to it.
		{Path: "a/hl", Type: tar.TypeLink, Link: "a/f1"},
		tartest.Dir("d", 0o755),
		tartest.File("d/x", 0o644, "x"),
		tartest.File("d/y", 0o755, "yyyy"),
		tartest.Dir("d/e", 0o755),
		tartest.File("d/e/z", 0o644, "z"),
		tartest.File("gone", 0o644, "gone"),
		tartest.Dir("o", 0o755),
		tartest.File("o/old", 0o644, "old"),
		{Path: "p", Type: tar.TypeFifo, Mode: 0o644},
		tartest.File("top", 0o644, "top"),
	}
	propMid = tartest.Layer{
		tartest.Whiteout("gone"),
		tartest.Dir("o", 0o755),
		tartest.Opaque("o"),
		tartest.File("o/new", 0o644, "new"),
		tartest.Dir("d", 0o755),
		tartest.Whiteout("d/y"),
		tartest.File("d/w", 0o644, "w"),
	}
)

// op is one container operation, replayable: it names its paths.
type op struct {
	kind    string
	p, q    string
	n       int64
	content string
}

func (o op) String() string { return fmt.Sprintf("%s(%s %s %d %q)", o.kind, o.p, o.q, o.n, o.content) }

var opKinds = []string{"create", "overwrite", "append", "chmod", "chown", "touch", "setxattr", "rmxattr",
	"rmfile", "rmdir", "recreate", "rename", "renamedir", "link", "symlink", "mkfifo", "mkdir"}

// genOps draws n operations, each on what the tree holds at that point: it
// replays them on a scratch copy to know the paths.
func listTree(root string) (files, dirs, others []string) {
	_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == root {
			return nil
		}
		rel, _ := filepath.Rel(root, p)
		if d.IsDir() {
			dirs = append(dirs, rel)
		} else if d.Type().IsRegular() {
			files = append(files, rel)
		} else {
			others = append(others, rel)
		}
		return nil
	})
	return files, dirs, others
}

func pick(r *rand.Rand, s []string) string {
	if len(s) == 0 {
		return ""
	}
	return s[r.Intn(len(s))]
}

func drawOp(r *rand.Rand, root string) op {
	files, dirs, others := listTree(root)
	dirsOrRoot := append([]string{"."}, dirs...)
	newName := func() string {
		return filepath.Join(pick(r, dirsOrRoot), fmt.Sprintf("n%d", r.Intn(6)))
	}
	o := op{kind: opKinds[r.Intn(len(opKinds))], n: r.Int63n(1 << 20), content: strings.Repeat(fmt.Sprint(r.Intn(1000)), 1+r.Intn(5))}
	all := append(append(append([]string{}, files...), dirs...), others...)
	switch o.kind {
	case "create", "symlink", "mkfifo", "mkdir":
		o.p = newName()
	case "overwrite", "append":
		o.p = pick(r, files)
	case "rmfile":
		o.p = pick(r, append(append([]string{}, files...), others...))
	case "chmod", "chown", "touch", "setxattr", "rmxattr":
		o.p = pick(r, all)
	case "rmdir", "recreate":
		o.p = pick(r, dirs)
	case "rename":
		o.p, o.q = pick(r, append(append([]string{}, files...), others...)), newName()
	case "link":
		o.p, o.q = pick(r, files), newName()
	case "renamedir":
		o.p, o.q = pick(r, dirs), newName()
	}
	return o
}

// do runs o in the mounted tree root; failures (a path gone, a rename into
// itself) are part of the game and ignored.
func (o op) do(root string) {
	p, q := filepath.Join(root, o.p), filepath.Join(root, o.q)
	switch o.kind {
	case "create", "overwrite":
		if f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|unix.O_NONBLOCK|unix.O_NOFOLLOW, 0o644); err == nil {
			_, _ = f.WriteString(o.content)
			_ = f.Close()
		}
	case "append":
		if f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND|unix.O_NONBLOCK|unix.O_NOFOLLOW, 0); err == nil {
			_, _ = f.WriteString(o.content)
			_ = f.Close()
		}
	case "chmod":
		if st, err := os.Lstat(p); err == nil && st.Mode()&os.ModeSymlink == 0 {
			_ = os.Chmod(p, os.FileMode(o.n&0o777)|os.ModeSticky*os.FileMode(o.n>>12&1))
		}
	case "chown":
		_ = os.Lchown(p, int(o.n%5), int(o.n/5%5))
	case "touch":
		tm := time.Unix(1500000000+o.n, 0)
		_ = os.Chtimes(p, tm, tm)
	case "setxattr":
		_ = unix.Lsetxattr(p, fmt.Sprintf("user.k%d", o.n%3), []byte(o.content), 0)
	case "rmxattr":
		// Not on directories: a layer tar cannot remove an xattr of a
		// directory it keeps (neither containerd's differ's nor ours).
		if st, err := os.Lstat(p); err != nil || st.IsDir() {
			return
		}
		_ = unix.Lremovexattr(p, fmt.Sprintf("user.k%d", o.n%3))
		_ = unix.Lremovexattr(p, "user.base")
	case "rmfile":
		_ = os.Remove(p)
	case "rmdir":
		_ = os.RemoveAll(p)
	case "recreate":
		if os.RemoveAll(p) == nil && os.Mkdir(p, 0o755) == nil {
			_ = os.WriteFile(filepath.Join(p, "again"), []byte(o.content), 0o644)
		}
	case "rename", "renamedir":
		_ = os.Rename(p, q)
	case "link":
		_ = os.Link(p, q)
	case "symlink":
		_ = os.Symlink(o.content, p)
	case "mkfifo":
		_ = unix.Mkfifo(p, 0o640)
	case "mkdir":
		_ = os.Mkdir(p, 0o711)
	}
}

// treeOf describes every file under root but root itself: type, mode,
// owner, content, link target, device, mtime of files, devices and FIFOs,
// user.* xattrs but the mounter's own (withXattrs) and security.capability.
func treeOf(t *testing.T, root string, withXattrs bool) map[string]string {
	t.Helper()
	out, err := testutil.Tree(root, testutil.TreeOpts{
		Fields: testutil.TreeType | testutil.TreePerm | testutil.TreeOwner | testutil.TreeContent |
			testutil.TreeLink | testutil.TreeMtimeSec | testutil.TreeDev,
		Xattr: func(_, x string) bool {
			return (withXattrs && strings.HasPrefix(x, "user.") && !strings.HasPrefix(x, "user.fuseoverlayfs.")) ||
				x == "security.capability"
		},
		SkipRoot: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// treeDiff is testutil.TreeDiff as one string, empty when the trees are
// the same.
func treeDiff(want, got map[string]string) string {
	return strings.Join(testutil.TreeDiff(want, got), "\n")
}

// propEnv holds the parent chain of one property run.
type propEnv struct {
	e        *env
	fast     *Differ
	walk     diff.Comparer
	parent   string
	unpriv   bool
	baseTars [][]byte
	n        int
}

func newPropEnv(t *testing.T, unpriv bool) *propEnv {
	e := newEnv(t)
	var opts []Opt
	if unpriv {
		opts = append(opts, WithUnprivilegedForms())
	}
	dif := e.differ(opts...)
	pe := &propEnv{e: e, fast: dif, walk: walking.NewWalkingDiff(e.store), parent: "mid", unpriv: unpriv,
		baseTars: [][]byte{layerTar(t, propBase...), layerTar(t, propMid...)}}
	e.unpack(t, dif, "base", "", "", pe.baseTars[0])
	e.unpack(t, dif, "mid", "base", "", pe.baseTars[1])
	return pe
}

// toFallbackForms rewrites an upper directory into the forms fuse-overlayfs
// writes where mknod and trusted.* are refused: `.wh.NAME` files for 0/0
// devices, user.fuseoverlayfs.opaque for trusted.overlay.opaque.
func toFallbackForms(t *testing.T, dir string) {
	t.Helper()
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		if st.Mode&unix.S_IFMT == unix.S_IFCHR && st.Rdev == 0 {
			if err := os.Remove(p); err != nil {
				return err
			}
			if filepath.Base(p) == ".wh..opq" {
				return nil // fuse-overlayfs makes this marker only where it can mknod
			}
			return os.WriteFile(filepath.Join(filepath.Dir(p), ".wh."+filepath.Base(p)), nil, 0o600)
		}
		if d.IsDir() {
			v := make([]byte, 16)
			if n, err := unix.Lgetxattr(p, "trusted.overlay.opaque", v); err == nil && string(v[:n]) == "y" {
				if err := unix.Lremovexattr(p, "trusted.overlay.opaque"); err != nil {
					return err
				}
				return unix.Lsetxattr(p, "user.fuseoverlayfs.opaque", []byte("y"), 0)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// run does ops in a container snapshot and checks the diffs; it returns a
// description of the first mismatch ("" if none).
func (pe *propEnv) run(t *testing.T, ops []op) string {
	t.Helper()
	e := pe.e
	pe.n++
	key := fmt.Sprintf("ctr%d", pe.n)
	mounts, err := e.sn.Prepare(e.ctx, key, pe.parent)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = e.sn.Remove(e.ctx, key) }()
	mnt := t.TempDir()
	if err := mount.All(mounts, mnt); err != nil {
		t.Fatal(err)
	}
	for _, o := range ops {
		o.do(mnt)
	}
	if err := mount.UnmountAll(mnt, 0); err != nil {
		t.Fatal(err)
	}
	if pe.unpriv {
		toFallbackForms(t, upperOf(t, mounts))
	}
	// What the container sees, from a fresh mount (fuse-overlayfs 1.10 may
	// show stale lower entries in a live mount after rm -rf; mkdir).
	if err := mount.All(mounts, mnt); err != nil {
		t.Fatal(err)
	}
	want := treeOf(t, mnt, true)
	wantNoX := treeOf(t, mnt, false)
	if err := mount.UnmountAll(mnt, 0); err != nil {
		t.Fatal(err)
	}
	lower, err := e.sn.View(e.ctx, key+"-lower", pe.parent)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = e.sn.Remove(e.ctx, key+"-lower") }()
	if _, _, err := pe.fast.compareLayers(lower, mounts); err != nil {
		t.Fatalf("our mounts not recognised: %v", err)
	}
	for _, c := range []struct {
		name   string
		cmp    diff.Comparer
		xattrs bool
	}{{"fast", pe.fast, true}, {"walking", pe.walk, false}} {
		desc, err := c.cmp.Compare(e.ctx, lower, mounts, diff.WithMediaType(ocispec.MediaTypeImageLayer))
		if err != nil {
			t.Fatalf("%s compare: %v", c.name, err)
		}
		got := pe.applyNative(t, desc)
		w := want
		if !c.xattrs {
			w = wantNoX
		}
		if d := treeDiff(w, treeOf(t, got, c.xattrs)); d != "" {
			return fmt.Sprintf("%s differ's tar applied natively differs from the container's tree:\n%s\ntar:\n%s", c.name, d, pe.listTar(t, desc))
		}
	}
	return ""
}

func upperOf(t *testing.T, mounts []mount.Mount) string {
	for _, o := range mounts[0].Options {
		if v, ok := strings.CutPrefix(o, "upperdir="); ok {
			return v
		}
	}
	t.Fatalf("no upperdir in %v", mounts)
	return ""
}

func (pe *propEnv) blobReader(t *testing.T, desc ocispec.Descriptor) io.Reader {
	ra, err := pe.e.store.ReaderAt(pe.e.ctx, desc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ra.Close() })
	r, err := compression.DecompressStream(content.NewReader(ra))
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func (pe *propEnv) applyNative(t *testing.T, desc ocispec.Descriptor) string {
	dir := t.TempDir()
	ctx := context.Background()
	for _, b := range pe.baseTars {
		if _, err := archive.Apply(ctx, dir, bytes.NewReader(b)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := archive.Apply(ctx, dir, pe.blobReader(t, desc)); err != nil {
		t.Fatalf("apply diff: %v", err)
	}
	return dir
}

func (pe *propEnv) listTar(t *testing.T, desc ocispec.Descriptor) string {
	tr := tar.NewReader(pe.blobReader(t, desc))
	var s []string
	for {
		h, err := tr.Next()
		if err != nil {
			break
		}
		s = append(s, fmt.Sprintf("  %c %s %o %d:%d %s %v", h.Typeflag, h.Name, h.Mode, h.Uid, h.Gid, h.Linkname, h.PAXRecords))
	}
	return strings.Join(s, "\n")
}

// TestCompareEquivalence: random container operations in a real
// fuse-overlayfs mount; the tar our Compare writes from the upper
// directory, applied with containerd's applier onto the parent chain in a
// plain directory, gives the tree the container saw, as the walking
// differ's tar does. Both whiteout forms. On failure the operations are
// shrunk to a minimal failing list.
func TestCompareEquivalence(t *testing.T) {
	testutil.RequireFUSE(t)
	t.Cleanup(func() { testutil.RequireNoLeftovers(t, "TestCompareEquivalence") })
	seed := testutil.Seed(t, "COMPARE_SEED")
	rounds := 15
	for _, unpriv := range []bool{false, true} {
		t.Run(fmt.Sprintf("unprivileged=%v", unpriv), func(t *testing.T) {
			pe := newPropEnv(t, unpriv)
			// A scratch tree to draw operations on: the parent chain applied natively.
			for round := range rounds {
				r := rand.New(rand.NewSource(seed + int64(round)))
				scratch := t.TempDir()
				for _, b := range pe.baseTars {
					if _, err := archive.Apply(context.Background(), scratch, bytes.NewReader(b)); err != nil {
						t.Fatal(err)
					}
				}
				var ops []op
				for range 10 + r.Intn(30) {
					o := drawOp(r, scratch)
					o.do(scratch)
					ops = append(ops, o)
				}
				msg := pe.run(t, ops)
				if msg == "" {
					continue
				}
				// Shrink: drop operations while the failure stays.
				for i := 0; i < len(ops); {
					fewer := append(append([]op{}, ops[:i]...), ops[i+1:]...)
					if m := pe.run(t, fewer); m != "" {
						ops, msg = fewer, m
					} else {
						i++
					}
				}
				t.Fatalf("seed %d round %d: after %v\n%s", seed, round, ops, msg)
			}
		})
	}
}
