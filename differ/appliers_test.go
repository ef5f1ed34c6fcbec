package differ

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/archive"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// change is one container change of the applier equivalence test. Where
// our tar cannot hold the walking differ's entries, onlyOurs and
// onlyWalking name the entries each list has that the other has not (the
// named exceptions); everything else must match.
type change struct {
	name        string
	do          func(t *testing.T, root string)
	onlyOurs    []string
	onlyWalking []string
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func write(t *testing.T, p, body string) {
	t.Helper()
	must(t, os.WriteFile(p, []byte(body), 0o644))
}

// Why our entries differ from the walking differ's where they do (and
// what tarEntries leaves out of the comparison):
//
//   - xattrs: containerd's ChangeWriter (v2.4.2 pkg/archive/tar.go) carries
//     only security.capability; we carry every xattr but fuse-overlayfs' and
//     overlay's own. tarEntries compares security.capability only.
//   - hard links: both write one name as the file and the others as links
//     to it, but the walking differ may pick another name to carry the
//     data. tarEntries describes a link as the file it points to.
//   - opaqueForm: a directory removed and re-created, renamed onto or marked
//     opaque over a lower one. The walking differ compares two trees and
//     writes a whiteout per lower name that is gone; we read the upper
//     directory, which only says "opaque", and write the opaque marker
//     (listing the lower directories to name each would cost a walk of the
//     lower tree). Both apply to the same tree with every applier.
//   - xattr changes: the walking differ does not compare xattrs but
//     security.capability (continuity v0.5.0 fs/path.go sameFile), so it
//     drops a setxattr or removexattr of a lower file or directory (only
//     the ctime changes); we write the file or directory.
//   - lower directory xattrs: a directory removed and re-created over a
//     lower one that has xattrs the new one lacks is also whited out first
//     (`.wh.DIR`, `DIR/`, `DIR/.wh..wh..opq`): appliers writing into a
//     merged tree keep the old directory's xattrs otherwise.
var changes = []change{
	{name: "new files", do: func(t *testing.T, r string) {
		write(t, filepath.Join(r, "newtop"), "n")
		write(t, filepath.Join(r, "a/b/newdeep"), "nd")
		must(t, os.MkdirAll(filepath.Join(r, "fresh/sub"), 0o750))
		write(t, filepath.Join(r, "fresh/sub/f"), "f")
	}},
	{name: "modify lower files", do: func(t *testing.T, r string) {
		write(t, filepath.Join(r, "a/f1"), "changed")
		f, err := os.OpenFile(filepath.Join(r, "a/b/c/deep"), os.O_WRONLY|os.O_APPEND, 0)
		must(t, err)
		_, err = f.WriteString("+more")
		must(t, err)
		must(t, f.Close())
	}},
	{name: "delete files", do: func(t *testing.T, r string) {
		must(t, os.Remove(filepath.Join(r, "top")))
		must(t, os.Remove(filepath.Join(r, "d/x")))
		must(t, os.Remove(filepath.Join(r, "p")))
		must(t, os.Remove(filepath.Join(r, "a/ln")))
	}},
	{name: "delete dirs", do: func(t *testing.T, r string) {
		must(t, os.RemoveAll(filepath.Join(r, "a/b")))
		must(t, os.RemoveAll(filepath.Join(r, "o")))
	}},
	{name: "remove and recreate dir", do: func(t *testing.T, r string) {
		must(t, os.RemoveAll(filepath.Join(r, "a/b"))) // has user.base
		must(t, os.Mkdir(filepath.Join(r, "a/b"), 0o755))
		write(t, filepath.Join(r, "a/b/only"), "only")
		must(t, os.RemoveAll(filepath.Join(r, "d")))
		must(t, os.Mkdir(filepath.Join(r, "d"), 0o700))
	},
		onlyOurs:    []string{"a/.wh.b", "a/b/.wh..wh..opq", "d/.wh..wh..opq"},
		onlyWalking: []string{"a/b/.wh.c", "a/b/.wh.g", "d/.wh.e", "d/.wh.w", "d/.wh.x"}},
	{name: "make dir opaque", do: func(t *testing.T, r string) {
		// What an unprivileged container can do; fuse-overlayfs 1.10 shows
		// a/b empty from the next mount on. The walking differ, comparing
		// the two trees of fresh mounts, writes whiteouts.
		must(t, unix.Setxattr(filepath.Join(r, "a/b"), "user.overlay.opaque", []byte("y"), 0))
	},
		onlyOurs:    []string{"a/b/.wh..wh..opq"},
		onlyWalking: []string{"a/b/.wh.c", "a/b/.wh.g"}},
	{name: "rename", do: func(t *testing.T, r string) {
		// fuse-overlayfs 1.10 refuses to rename a lower directory (EXDEV:
		// mv copies it), not a new one or a file.
		must(t, os.Rename(filepath.Join(r, "a/f2"), filepath.Join(r, "renamed")))
		must(t, os.Rename(filepath.Join(r, "d/x"), filepath.Join(r, "a/f1")))
		must(t, os.Mkdir(filepath.Join(r, "nd"), 0o755))
		write(t, filepath.Join(r, "nd/f"), "f")
		must(t, os.Rename(filepath.Join(r, "nd"), filepath.Join(r, "d/nd2")))
	}},
	{name: "rename dir onto lower dir", do: func(t *testing.T, r string) {
		must(t, os.Mkdir(filepath.Join(r, "nd"), 0o755))
		write(t, filepath.Join(r, "nd/f"), "f")
		must(t, os.RemoveAll(filepath.Join(r, "o")))
		must(t, os.Rename(filepath.Join(r, "nd"), filepath.Join(r, "o")))
	},
		onlyOurs:    []string{"o/.wh..wh..opq"},
		onlyWalking: []string{"o/.wh.new"}},
	{name: "hard links", do: func(t *testing.T, r string) {
		must(t, os.Link(filepath.Join(r, "a/f1"), filepath.Join(r, "d/lf1")))
		write(t, filepath.Join(r, "nf"), "nf")
		must(t, os.Link(filepath.Join(r, "nf"), filepath.Join(r, "a/lnf")))
	}},
	{name: "symlinks", do: func(t *testing.T, r string) {
		must(t, os.Symlink("../top", filepath.Join(r, "a/up")))
		must(t, os.Remove(filepath.Join(r, "a/ln")))
		must(t, os.Symlink("f2", filepath.Join(r, "a/ln")))
	}},
	{name: "xattrs", do: func(t *testing.T, r string) {
		must(t, unix.Lsetxattr(filepath.Join(r, "a/f1"), "user.k", []byte("v"), 0))
		must(t, unix.Lsetxattr(filepath.Join(r, "a/b"), "user.k", []byte("dv"), 0))
		must(t, unix.Lremovexattr(filepath.Join(r, "a/f2"), "user.base"))
	},
		onlyOurs: []string{"a/", "a/b/", "a/f1", "a/f2"}},
	{name: "mode and owner", do: func(t *testing.T, r string) {
		must(t, os.Chmod(filepath.Join(r, "a/f1"), 0o600))
		must(t, os.Lchown(filepath.Join(r, "d/e/z"), 3, 4))
		must(t, os.Chmod(filepath.Join(r, "o"), 0o700))
		must(t, os.Lchown(filepath.Join(r, "a/b/c"), 5, 5))
	}},
	{name: "copy-up only", do: func(t *testing.T, r string) {
		// Opened for writing, nothing changed: fuse-overlayfs copies up
		// the file and its directories; the layer is empty.
		f, err := os.OpenFile(filepath.Join(r, "a/b/g"), os.O_RDWR, 0)
		must(t, err)
		must(t, f.Close())
		write(t, filepath.Join(r, "d/w"), "w")
	}},
	{name: "created and removed", do: func(t *testing.T, r string) {
		// A mount stub made and removed again (BuildKit removes the
		// stubs of its RUN mounts, /etc/hosts say, if the image had none):
		// fuse-overlayfs leaves a/ and a/b/c/ copied up, with new mtimes;
		// neither is a change.
		write(t, filepath.Join(r, "a/b/c/stub"), "")
		must(t, os.Remove(filepath.Join(r, "a/b/c/stub")))
	}},
	{name: "wh-named dir", do: func(t *testing.T, r string) {
		// fuse-overlayfs refuses files named .wh.*, not directories; from
		// the next mount on it hides the directory and d/x.
		must(t, os.Mkdir(filepath.Join(r, "d/.wh.x"), 0o755))
		write(t, filepath.Join(r, "d/.wh.x/kid"), "k")
		must(t, os.Mkdir(filepath.Join(r, "d/.wh.nothing"), 0o755))
	},
	// The walking differ compares fresh mounts, which hide d/x: it
	// writes d/ and d/.wh.x as we do.
	},
	{name: "wh-named files", do: func(t *testing.T, r string) {
		// fuse-overlayfs refuses to create files named like whiteouts ...
		for _, n := range []string{".wh.top", "d/.wh..wh..opq", "a/.wh..opq"} {
			if err := os.WriteFile(filepath.Join(r, n), nil, 0o644); !errors.Is(err, unix.EINVAL) {
				t.Fatalf("create %s through the mount: got %v, want EINVAL", n, err)
			}
		}
		// ... but makes a directory named like the opaque marker, and
		// shows d opaque from the next mount on.
		must(t, os.Mkdir(filepath.Join(r, "d/.wh..wh..opq"), 0o755))
	},
		onlyOurs:    []string{"d/.wh..wh..opq"},
		onlyWalking: []string{"d/.wh.e", "d/.wh.w", "d/.wh.x"}},
}

// TestComparersAppliers: for each change made in a real fuse-overlayfs
// container mount, our Compare's tar applied with each applier users run
// (containerd's naive applier into a copy of the parent, as the native
// snapshotter does; containerd's overlayfs applier into an empty upper
// read through a kernel overlay mount; ours, read through our snapshotter's
// mount) gives the tree the container sees after a remount; and its entry
// list is the walking differ's, but for the named exceptions.
func TestComparersAppliers(t *testing.T) {
	testutil.RequireFUSE(t)
	t.Cleanup(func() { testutil.RequireNoLeftovers(t, "TestComparersAppliers") })
	for _, unpriv := range []bool{false, true} {
		t.Run(fmt.Sprintf("unprivileged=%v", unpriv), func(t *testing.T) { comparersAppliers(t, unpriv) })
	}
}

// comparersAppliers runs the changes with the whiteout forms fuse-overlayfs
// writes as root (unpriv false) or where mknod and trusted.* are refused.
func comparersAppliers(t *testing.T, unpriv bool) {
	pe := newPropEnv(t, unpriv)
	ovlLowers := pe.overlayLowers(t)
	for i, c := range changes {
		t.Run(c.name, func(t *testing.T) {
			want, ours, walk := pe.changeTars(t, c)
			if d := treeDiff(want, treeOf(t, pe.naiveApply(t, ours), true)); d != "" {
				t.Errorf("containerd's naive applier:\n%s\ntar:\n%s", d, tarList(t, ours))
			}
			if d := treeDiff(want, treeOf(t, overlayApply(t, ovlLowers, ours), true)); d != "" {
				t.Errorf("containerd's overlayfs applier on kernel overlay:\n%s\ntar:\n%s", d, tarList(t, ours))
			}
			if d := treeDiff(want, treeOf(t, pe.ourApply(t, fmt.Sprintf("apply%d", i), ours), true)); d != "" {
				t.Errorf("our applier:\n%s\ntar:\n%s", d, tarList(t, ours))
			}
			gotOurs, gotWalk := entryDiff(tarEntries(t, ours), tarEntries(t, walk))
			if !slices.Equal(gotOurs, sorted(c.onlyOurs)) || !slices.Equal(gotWalk, sorted(c.onlyWalking)) {
				t.Errorf("entries only in ours %q (want %q), only in the walking differ's %q (want %q)\nours:\n%s\nwalking:\n%s",
					gotOurs, sorted(c.onlyOurs), gotWalk, sorted(c.onlyWalking), tarList(t, ours), tarList(t, walk))
			}
			t.Logf("ours:\n%s\nwalking:\n%s", tarList(t, ours), tarList(t, walk))
		})
	}
}

func sorted(s []string) []string {
	s = slices.Clone(s)
	sort.Strings(s)
	return s
}

// changeTars makes change c in a container snapshot over the parent chain
// and returns the container's tree (from a fresh mount), our Compare's tar
// and the walking differ's.
func (pe *propEnv) changeTars(t *testing.T, c change) (map[string]string, []byte, []byte) {
	t.Helper()
	e := pe.e
	pe.n++
	key := fmt.Sprintf("change%d", pe.n)
	mounts, err := e.sn.Prepare(e.ctx, key, pe.parent)
	must(t, err)
	t.Cleanup(func() { _ = e.sn.Remove(e.ctx, key) })
	mnt := t.TempDir()
	must(t, mount.All(mounts, mnt))
	t.Cleanup(func() { _ = mount.UnmountAll(mnt, 0) }) // after a failed change
	c.do(t, mnt)
	must(t, mount.UnmountAll(mnt, 0))
	if pe.unpriv {
		toFallbackForms(t, upperOf(t, mounts))
	}
	must(t, mount.All(mounts, mnt))
	want := treeOf(t, mnt, true)
	must(t, mount.UnmountAll(mnt, 0))
	lower, err := e.sn.View(e.ctx, key+"-lower", pe.parent)
	must(t, err)
	t.Cleanup(func() { _ = e.sn.Remove(e.ctx, key+"-lower") })
	var tars [2][]byte
	for i, cmp := range []diff.Comparer{pe.fast, pe.walk} {
		desc, err := cmp.Compare(e.ctx, lower, mounts, diff.WithMediaType(ocispec.MediaTypeImageLayer))
		must(t, err)
		b, err := io.ReadAll(pe.blobReader(t, desc))
		must(t, err)
		tars[i] = b
	}
	return want, tars[0], tars[1]
}

// naiveApply is the native snapshotter's way: every layer applied by
// containerd's archive.Apply into one directory.
func (pe *propEnv) naiveApply(t *testing.T, layerTar []byte) string {
	dir := t.TempDir()
	for _, b := range append(slices.Clone(pe.baseTars), layerTar) {
		if _, err := archive.Apply(context.Background(), dir, bytes.NewReader(b)); err != nil {
			t.Fatalf("containerd's naive applier: %v", err)
		}
	}
	return dir
}

// overlayLowers applies the parent chain as the overlayfs snapshotter
// does, each layer into its own empty directory; newest first.
func (pe *propEnv) overlayLowers(t *testing.T) []string {
	var dirs []string
	for _, b := range pe.baseTars {
		dirs = append([]string{overlayLayer(t, b)}, dirs...)
	}
	return dirs
}

func overlayLayer(t *testing.T, layerTar []byte) string {
	dir := t.TempDir()
	_, err := archive.Apply(context.Background(), dir, bytes.NewReader(layerTar),
		archive.WithConvertWhiteout(archive.OverlayConvertWhiteout))
	if err != nil {
		t.Fatalf("containerd's overlayfs applier: %v", err)
	}
	return dir
}

// overlayApply applies layerTar with containerd's overlayfs applier and
// returns a read-only kernel overlay mount of it over lowers.
func overlayApply(t *testing.T, lowers []string, layerTar []byte) string {
	top := overlayLayer(t, layerTar)
	return testutil.KernelOverlayOf(t, append([]string{top}, lowers...))
}

// ourApply applies layerTar with our applier over the parent chain and
// returns a mount of the result through our snapshotter.
func (pe *propEnv) ourApply(t *testing.T, name string, layerTar []byte) string {
	pe.e.unpack(t, pe.fast, name, pe.parent, "", layerTar)
	return pe.e.view(t, name)
}

// tarEntries describes each entry: name, type, mode, owner, size, link
// target, security.capability (not the times, not other xattrs); a hard
// link as the file it points to, and that file as linked.
func tarEntries(t *testing.T, b []byte) map[string]string {
	out := map[string]string{}
	hdrs := map[string]*tar.Header{}
	var names []string
	tr := tar.NewReader(bytes.NewReader(b))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		must(t, err)
		if _, dup := hdrs[h.Name]; dup {
			t.Errorf("entry %s written twice", h.Name)
		}
		hdrs[h.Name] = h
		names = append(names, h.Name)
	}
	linked := map[string]bool{}
	for _, n := range names {
		if h := hdrs[n]; h.Typeflag == tar.TypeLink {
			linked[h.Linkname] = true
		}
	}
	for _, n := range names {
		h, how := hdrs[n], ""
		if h.Typeflag == tar.TypeLink && hdrs[h.Linkname] != nil {
			h, how = hdrs[h.Linkname], " linked"
		} else if linked[n] {
			how = " linked"
		}
		link := h.Linkname
		if h.Typeflag == tar.TypeLink {
			link = "link to " + link
		}
		out[n] = fmt.Sprintf("%c %o %d:%d %d %s cap=%q%s", h.Typeflag, h.Mode, h.Uid, h.Gid, h.Size, link,
			h.PAXRecords["SCHILY.xattr.security.capability"], how)
	}
	return out
}

// entryDiff lists the names whose entries are only in a, and only in b
// (an entry in both that differs counts in both).
func entryDiff(a, b map[string]string) (onlyA, onlyB []string) {
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			onlyA = append(onlyA, k)
		}
	}
	for k, v := range b {
		if w, ok := a[k]; !ok || w != v {
			onlyB = append(onlyB, k)
		}
	}
	sort.Strings(onlyA)
	sort.Strings(onlyB)
	return onlyA, onlyB
}

func tarList(t *testing.T, b []byte) string {
	tr := tar.NewReader(bytes.NewReader(b))
	var s []string
	for {
		h, err := tr.Next()
		if err != nil {
			break
		}
		var xs []string
		for k, v := range h.PAXRecords {
			if x, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
				xs = append(xs, x+"="+v)
			}
		}
		sort.Strings(xs)
		s = append(s, fmt.Sprintf("  %c %-22s %04o %d:%d %4d %s %s", h.Typeflag, h.Name, h.Mode, h.Uid, h.Gid, h.Size, h.Linkname, strings.Join(xs, ",")))
	}
	return strings.Join(s, "\n")
}
