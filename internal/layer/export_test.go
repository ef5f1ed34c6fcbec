package layer

import (
	"archive/tar"
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// exportNames runs Export of upper over lowers and lists the tar's entry
// names in order.
func exportNames(t *testing.T, upper string, lowers ...string) []string {
	t.Helper()
	var buf bytes.Buffer
	if err := Export(context.Background(), &buf, upper, ExportOptions{Lowers: lowers}); err != nil {
		t.Fatalf("export: %v", err)
	}
	var names []string
	tr := tar.NewReader(&buf)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return names
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
	}
}

// mk makes the files of a test layer directory under root: a name ending
// in "/" is a directory (mode 0755), "@" a 0/0 character device (a
// fuse-overlayfs whiteout), anything else a file holding its own name.
// All get the same whole-second mtime, as files from a tar have.
func mk(t *testing.T, root string, names ...string) {
	t.Helper()
	tm := time.Unix(1600000000, 0)
	for _, n := range names {
		p := filepath.Join(root, n)
		var err error
		switch {
		case n[len(n)-1] == '/':
			if err = os.Mkdir(p, 0o755); err == nil {
				err = os.Chmod(p, 0o755)
			}
		case n[len(n)-1] == '@':
			p = p[:len(p)-1]
			err = unix.Mknod(p, unix.S_IFCHR, 0)
		default:
			err = os.WriteFile(p, []byte(n), 0o644)
		}
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(p, tm, tm); err != nil {
			t.Fatal(err)
		}
	}
}

func setX(t *testing.T, p, name, value string) {
	t.Helper()
	if err := unix.Lsetxattr(p, name, []byte(value), 0); err != nil {
		t.Fatalf("setxattr %s on %s: %v", name, p, err)
	}
}

func wantNames(t *testing.T, got []string, want ...string) {
	t.Helper()
	if !slices.Equal(got, want) {
		t.Errorf("entries\n  %q\nwant\n  %q", got, want)
	}
}

// TestExportWhiteoutsOnce: every way fuse-overlayfs (or a container) can
// hide a lower name gives one whiteout: a 0/0 device, a `.wh.NAME` file, a
// `.wh.NAME` directory a container made (fuse-overlayfs hides it and NAME
// from the next mount on), never the directory's content.
func TestExportWhiteoutsOnce(t *testing.T) {
	testutil.RequireRoot(t)
	lower, upper := t.TempDir(), t.TempDir()
	mk(t, lower, "x", "d/", "d/y", "d/z")
	mk(t, upper, "x@", ".wh.x", "d/", "d/y@", "d/.wh.y/", "d/.wh.y/kid", "d/.wh.z/", "d/.wh.z/kid", "d/.wh.none/", "d/.wh.none/kid", "d/.wh./", "d/.wh./kid")
	wantNames(t, exportNames(t, upper, lower), ".wh.x", "d/", "d/.wh.y", "d/.wh.z")
}

// TestExportOpaqueForms: a directory over a lower one that fuse-overlayfs
// shows opaque (its opaque xattr, the user.overlay.opaque=y an
// unprivileged container can set) is the directory, then its opaque
// marker, then its content; whited out first only if the lower directory
// has xattrs the new one lacks (appliers writing into a merged tree would
// keep them).
func TestExportOpaqueForms(t *testing.T) {
	testutil.RequireRoot(t)
	lower, upper := t.TempDir(), t.TempDir()
	mk(t, lower, "o/", "o/old", "u/", "u/old", "x/", "x/old")
	setX(t, filepath.Join(lower, "x"), "user.k", "v")
	mk(t, upper, "o/", "o/new", "u/", "x/", "x/new")
	setX(t, filepath.Join(upper, "o"), OpaqueXattrTrusted, "y")
	setX(t, filepath.Join(upper, "u"), "user.overlay.opaque", "y")
	setX(t, filepath.Join(upper, "x"), OpaqueXattrUser, "y")
	wantNames(t, exportNames(t, upper, lower),
		"o/", "o/.wh..wh..opq", "o/new",
		"u/", "u/.wh..wh..opq",
		".wh.x", "x/", "x/.wh..wh..opq", "x/new")
}

// TestExportCopyUpsLeftOut: what fuse-overlayfs copies up without a change
// (a file opened for writing, and the directories on its way) is not in
// the layer, as the walking differ leaves it out; a copy-up whose content
// changed at the same size and mtime, or whose mode or xattrs changed, is.
func TestExportCopyUpsLeftOut(t *testing.T) {
	testutil.RequireRoot(t)
	lower, upper := t.TempDir(), t.TempDir()
	mk(t, lower, "c/", "c/same", "c/e/", "c/e/same", "m/", "m/f", "m/g", "m/h")
	mk(t, upper, "c/", "c/same", "c/e/", "c/e/same", "m/", "m/f", "m/g", "m/h")
	for _, f := range []string{"c/same", "c/e/same", "m/f", "m/g", "m/h"} {
		setX(t, filepath.Join(upper, f), originXattr, f)
	}
	tm := time.Unix(1600000000, 0)
	if err := os.WriteFile(filepath.Join(upper, "m/f"), []byte("M/F"), 0o644); err != nil { // same size
		t.Fatal(err)
	}
	if err := os.Chtimes(filepath.Join(upper, "m/f"), tm, tm); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Join(upper, "m/g"), 0o600); err != nil {
		t.Fatal(err)
	}
	setX(t, filepath.Join(upper, "m/h"), "user.new", "1")
	wantNames(t, exportNames(t, upper, lower), "m/", "m/f", "m/g", "m/h")
}

// TestLowerUserOverlayOpaque: a lower directory a container marked
// user.overlay.opaque=y (a committed upper keeps it) hides the layers below
// it, as fuse-overlayfs shows it: a hard link to a file only those layers
// hold is refused, not copied up from them.
func TestLowerUserOverlayOpaque(t *testing.T) {
	s := newStack(t, 3)
	if err := Apply(context.Background(), s.dirs[0], bytes.NewReader(tarOf(t, dir("d"), file("d/f", "old"))), Options{Lowers: s.lowers(0)}); err != nil {
		t.Fatal(err)
	}
	mid := filepath.Join(s.dirs[1], "d")
	if err := os.Mkdir(mid, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Setxattr(mid, userOpaqueXattr, []byte("y"), 0); err != nil {
		t.Fatal(err)
	}
	err := Apply(context.Background(), s.dirs[2], bytes.NewReader(tarOf(t, hardlink("x", "d/f"))), Options{Lowers: s.lowers(2)})
	if err == nil {
		t.Fatal("a hard link to d/f under a user.overlay.opaque lower directory was applied; fuse-overlayfs shows no d/f there")
	}
	if _, serr := os.Lstat(filepath.Join(s.dirs[2], "x")); !os.IsNotExist(serr) {
		t.Errorf("x exists in the layer after the refused link (%v)", serr)
	}
	t.Logf("refused: %v", err)
}
