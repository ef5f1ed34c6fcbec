package layer

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

type layerCase struct {
	name   string
	layers [][]ent
	// hidden must not be reachable by path through the mount (lookups,
	// not only listings: fuse-overlayfs has shown the difference).
	hidden []string
	// present must be reachable.
	present []string
}

var layerCases = []layerCase{
	{
		name: "whiteouts",
		layers: [][]ent{
			{dir("a"), file("a/f1", "1"), file("a/f2", "2"), dir("b"), file("b/x", "x"), file("c", "c"), dir("keep"), file("keep/k", "k")},
			{dir("a"), whiteout("a", "f1"), whiteout("", "b"), whiteout("", "c"), whiteout("keep", "never-existed")},
		},
		hidden:  []string{"a/f1", "b", "b/x", "c"},
		present: []string{"a/f2", "keep/k"},
	},
	{
		name: "opaque",
		layers: [][]ent{
			{dir("d"), file("d/x", "x"), dir("d/sub"), file("d/sub/y", "y"), file("gone", "g"), dir("e"), file("e/old", "o")},
			// The whiteout in the parent is what trips fuse-overlayfs'
			// lookup when an opaque dir also holds whiteout markers.
			{dir("d"), opaque("d"), file("d/new", "n"), whiteout("", "gone"), dir("e"), whiteout("e", "old"), opaque("e"), file("e/n2", "n")},
		},
		hidden:  []string{"d/x", "d/sub", "d/sub/y", "gone", "e/old"},
		present: []string{"d/new", "e/n2"},
	},
	{
		name: "dir deleted and re-created",
		layers: [][]ent{
			{dir("d"), file("d/old", "o"), dir("d/deep"), file("d/deep/z", "z"), dir("i"), file("i/old", "o"), file("f", "f")},
			{whiteout("", "d"), dir("d").withMode(0o700), file("d/new", "n"), whiteout("", "i"), file("i/new", "n"), whiteout("", "f"), dir("f")},
		},
		hidden:  []string{"d/old", "d/deep", "d/deep/z", "i/old"},
		present: []string{"d/new", "i/new", "f"},
	},
	{
		name: "hard links",
		layers: [][]ent{
			{dir("bin"), file("bin/a", "aaa").withMode(0o755), hardlink("bin/b", "bin/a"), file("lib", "l"), dir("etc"), file("etc/conf", "c").owned(7, 8)},
			{hardlink("bin/c", "bin/a"), hardlink("etc/conf2", "etc/conf"), dir("new"), hardlink("new/lib", "lib"), file("own", "o"), hardlink("own2", "own")},
			// Deletes a file that a lower layer hard-links.
			{whiteout("bin", "a"), whiteout("", "lib")},
		},
		hidden:  []string{"bin/a", "lib"},
		present: []string{"bin/b", "bin/c", "etc/conf2", "new/lib", "own2"},
	},
	{
		name: "hard link then target replaced",
		layers: [][]ent{
			{file("t", "old")},
			{hardlink("l", "t"), file("t", "new")},
		},
		present: []string{"l", "t"},
	},
	{
		name: "symlinks",
		layers: [][]ent{
			{dir("real"), file("real/r", "r"), symlink("abs", "/real"), symlink("rel", "real"), symlink("dangling", "nowhere/x"), symlink("up", "../../..")},
			// Entries through symlinked parents land where the links point,
			// inside the layer.
			{file("abs/via-abs", "a"), file("rel/via-rel", "b"), file("up/via-up", "c"), symlink("real/self", "../real")},
		},
		present: []string{"real/via-abs", "real/via-rel", "via-up"},
	},
	{
		name: "xattrs special bits fifo devices owners",
		layers: [][]ent{
			{dir("d").withXattr("user.dir", "dv"), file("d/f", "x").withXattr("user.file", "fv"), file("suid", "s").withMode(0o4755),
				dir("sgid").withMode(0o2775), dir("tmp").withMode(0o1777), ent{name: "fifo", typ: tar.TypeFifo, mode: 0o600},
				ent{name: "null", typ: tar.TypeChar, mode: 0o666}.withDev(1, 3), ent{name: "blk", typ: tar.TypeBlock, mode: 0o660}.withDev(7, 0),
				file("owned", "o").owned(1000, 1001), dir("od").owned(123, 456).withMode(0o750), symlink("ol", "owned").owned(55, 66),
				file("trusted", "t").withXattr("trusted.overlay.opaque", "y")},
			{file("d/f", "y").withXattr("user.file", "new"), file("sgid/inherit", "i"), ent{name: "fifo2", typ: tar.TypeFifo, mode: 0o640}.owned(3, 4)},
		},
		present: []string{"fifo", "fifo2", "sgid/inherit"},
	},
	{
		name: "file before its parent directory",
		layers: [][]ent{
			{dir("keep").withMode(0o711).owned(9, 9), file("keep/old", "o")},
			{file("p/q/file", "f"), dir("p/q").withMode(0o700).owned(5, 6), dir("p").withMode(0o711), file("keep/sub/x", "x"), dir("keep/sub").withMode(0o750)},
		},
		present: []string{"p/q/file", "keep/sub/x", "keep/old"},
	},
	{
		name: "whiteout in a directory missing below",
		layers: [][]ent{
			{file("base", "b")},
			{whiteout("nodir", "x"), whiteout("", "nothing")},
		},
		present: []string{"base"},
	},
}

func formsUnder(t *testing.T) map[string]Forms {
	t.Helper()
	probed := ProbeForms(t.TempDir())
	if !probed.DeviceWhiteouts || probed.OpaqueXattr != OpaqueXattrTrusted {
		// As root the privileged forms must work; otherwise the first
		// case would silently test the fallback twice.
		t.Fatalf("as root, probe found %+v", probed)
	}
	return map[string]Forms{"privileged": probed, "unprivileged": FallbackForms}
}

// TestApplySameAsNative applies each case directly into layer directories
// (sequentially with the lowers known, and detached then finished as in a
// parallel unpack), in both whiteout forms, and compares the tree seen
// through a real fuse-overlayfs mount with what containerd's extraction
// makes of the same layers in one directory (the native snapshotter).
func TestApplySameAsNative(t *testing.T) {
	testutil.RequireFUSE(t)
	t.Cleanup(func() { testutil.RequireNoLeftovers(t, "TestApplySameAsNative") })
	forms := formsUnder(t)
	for _, c := range layerCases {
		native := tree(t, applyNative(t, c.layers))
		for _, fname := range []string{"privileged", "unprivileged"} {
			for _, detached := range []bool{false, true} {
				mode := "sequential"
				if detached {
					mode = "detached"
				}
				t.Run(c.name+"/"+fname+"/"+mode, func(t *testing.T) {
					s := applyOurs(t, c.layers, forms[fname], detached)
					mnt := mountStack(t, s)
					// Lookups first, before anything lists a directory, then
					// again after the walk (fuse-overlayfs caches listings).
					checkReach(t, mnt, c)
					got := tree(t, mnt)
					checkReach(t, mnt, c)
					for _, d := range testutil.TreeDiff(native, got) {
						t.Error(d)
					}
				})
			}
		}
	}
}

func checkReach(t *testing.T, mnt string, c layerCase) {
	t.Helper()
	for _, h := range c.hidden {
		if _, err := os.Lstat(filepath.Join(mnt, h)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s should be hidden, lstat: %v", h, err)
		}
	}
	for _, p := range c.present {
		if _, err := os.Lstat(filepath.Join(mnt, p)); err != nil {
			t.Errorf("%s should be there: %v", p, err)
		}
	}
}

// TestForms checks what lands in the layer directory in each form.
func TestForms(t *testing.T) {
	testutil.RequireRoot(t)
	layers := [][]ent{
		{dir("d"), file("d/x", "x"), file("f", "f")},
		{whiteout("", "f"), dir("d"), opaque("d"), file("d/y", "y")},
	}
	for name, f := range formsUnder(t) {
		t.Run(name, func(t *testing.T) {
			s := applyOurs(t, layers, f, false)
			top := s.dirs[1]
			var st unix.Stat_t
			errF := unix.Lstat(filepath.Join(top, "f"), &st)
			_, errWh := os.Lstat(filepath.Join(top, ".wh.f"))
			if f.DeviceWhiteouts {
				if errF != nil || !isWhiteoutDev(&st) || errWh == nil {
					t.Errorf("want a 0/0 device f and no .wh.f: %v %o %v", errF, st.Mode, errWh)
				}
			} else if errF == nil || errWh != nil {
				t.Errorf("want a .wh.f file and no f: %v %v", errF, errWh)
			}
			v, err := getXattr(filepath.Join(top, "d"), f.OpaqueXattr)
			if err != nil || string(v) != "y" {
				t.Errorf("opaque xattr %s: %q %v", f.OpaqueXattr, v, err)
			}
			entries, err := os.ReadDir(filepath.Join(top, "d"))
			if err != nil || len(entries) != 1 || entries[0].Name() != "y" {
				t.Errorf("opaque dir should hold only y (no markers): %v %v", entries, err)
			}
		})
	}
}

// TestPathTraversal tries to write outside the layer directory in every way
// a tar can say it; each attempt must fail or stay inside.
func TestPathTraversal(t *testing.T) {
	testutil.RequireRoot(t)
	attempts := []struct {
		name    string
		ents    []ent
		inside  string // where the file must land, if it does
		wantErr bool
	}{
		{name: "dotdot", ents: []ent{file("../../../evil", "e")}, inside: "evil"},
		{name: "absolute", ents: []ent{file("/evil", "e")}, inside: "evil"},
		{name: "dotdot inside", ents: []ent{dir("a"), file("a/../../../../evil", "e")}, inside: "evil"},
		{name: "symlink up", ents: []ent{symlink("esc", "../../../.."), file("esc/evil", "e")}, inside: "evil"},
		{name: "symlink absolute", ents: []ent{symlink("esc", "/"), file("esc/evil", "e")}, inside: "evil"},
		// As containerd's fs.RootPath: a symlink's target is cleaned by name
		// first, so "a/b/.." is "a" whatever a/b is.
		{name: "symlink chain", ents: []ent{dir("a"), symlink("a/b", "../../.."), symlink("c", "a/b/.."), file("c/evil", "e")}, inside: "a/evil"},
		{name: "symlink then dir", ents: []ent{symlink("esc", "../.."), dir("esc/sub"), file("esc/sub/evil", "e")}, inside: "sub/evil"},
		{name: "lower symlink up", ents: []ent{file("lowerlink/evil", "e")}, inside: "evil"},
		{name: "hard link outside", ents: []ent{hardlink("hl", "../../../outside")}, wantErr: true},
		{name: "hard link via symlink", ents: []ent{symlink("esc", "../../.."), hardlink("hl", "esc/outside")}, wantErr: true},
		{name: "symlink loop", ents: []ent{symlink("l1", "l2"), symlink("l2", "l1"), file("l1/evil", "e")}, wantErr: true},
		{name: "whiteout outside", ents: []ent{whiteout("../..", "outside")}},
		{name: "whiteout via symlink", ents: []ent{symlink("esc", "../../.."), whiteout("esc", "outside")}},
		{name: "opaque via symlink", ents: []ent{symlink("esc", "../../.."), opaque("esc")}},
	}
	for _, a := range attempts {
		for _, detached := range []bool{false, true} {
			t.Run(a.name+map[bool]string{false: "/sequential", true: "/detached"}[detached], func(t *testing.T) {
				sandbox := t.TempDir()
				s := &stack{root: sandbox}
				for i := 1; i <= 2; i++ {
					d := filepath.Join(sandbox, "snapshots", string(rune('0'+i)), "fs")
					if err := os.MkdirAll(d, 0o755); err != nil {
						t.Fatal(err)
					}
					s.dirs = append(s.dirs, d)
				}
				if err := os.Symlink("../../../..", filepath.Join(s.dirs[0], "lowerlink")); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(sandbox, "outside"), []byte("secret"), 0o644); err != nil {
					t.Fatal(err)
				}
				before := tree(t, sandbox)
				opts := Options{Lowers: s.lowers(1)}
				if detached {
					opts = Options{Detached: true, StateFile: s.state(1)}
				}
				err := Apply(context.Background(), s.dirs[1], bytes.NewReader(tarOf(t, a.ents...)), opts)
				if detached && err == nil {
					err = Finish(context.Background(), s.dirs[1], s.state(1), s.lowers(1))
				}
				if a.wantErr && err == nil {
					t.Error("want an error")
				}
				if !a.wantErr && err != nil && a.inside != "" {
					t.Errorf("apply: %v", err)
				}
				after := tree(t, sandbox)
				for k, v := range after {
					if strings.HasPrefix(k, "snapshots/2") {
						continue
					}
					if before[k] != v {
						t.Errorf("outside the layer: %s changed or appeared: %s", k, v)
					}
				}
				for k := range before {
					if _, ok := after[k]; !ok {
						t.Errorf("outside the layer: %s removed", k)
					}
				}
				if a.inside != "" && err == nil {
					if _, err := os.Lstat(filepath.Join(s.dirs[1], a.inside)); err != nil && !detached {
						t.Errorf("entry did not land inside at %s: %v", a.inside, err)
					}
				}
			})
		}
	}
}

// TestApplyErrors checks bad layers are refused with the right class.
func TestApplyErrors(t *testing.T) {
	testutil.RequireRoot(t)
	s := newStack(t, 2)
	for _, tc := range []struct {
		name  string
		ents  []ent
		class func(error) bool
	}{
		{"hard link to missing file", []ent{hardlink("l", "missing")}, errdefs.IsNotFound},
		{"hard link to directory", []ent{dir("d"), hardlink("l", "d")}, errdefs.IsInvalidArgument},
		{"whiteout of nothing", []ent{file("d/.wh.", "")}, errdefs.IsInvalidArgument},
		{"device number out of range", []ent{ent{name: "dev", typ: tar.TypeChar, mode: 0o600}.withDev(1<<33, 0)}, errdefs.IsInvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := Apply(context.Background(), s.dirs[1], bytes.NewReader(tarOf(t, tc.ents...)), Options{Lowers: s.lowers(1)})
			if !tc.class(err) {
				t.Fatalf("got %v", err)
			}
		})
	}
	// Garbage instead of a tar.
	if err := Apply(context.Background(), s.dirs[1], strings.NewReader(strings.Repeat("x", 1024)), Options{}); err == nil {
		t.Fatal("garbage accepted")
	}
	// A detached layer whose hard link target never shows up.
	st := s.state(1)
	if err := Apply(context.Background(), s.dirs[1], bytes.NewReader(tarOf(t, hardlink("l2", "nowhere"))), Options{Detached: true, StateFile: st}); err != nil {
		t.Fatal(err)
	}
	if err := Finish(context.Background(), s.dirs[1], st, nil); !errdefs.IsNotFound(err) {
		t.Fatalf("finish without parent: %v", err)
	}
	if err := Finish(context.Background(), s.dirs[1], st, s.lowers(1)); !errdefs.IsNotFound(err) {
		t.Fatalf("finish with parent lacking the target: %v", err)
	}
}

// TestDetachedBaseLosesMarkers: a layer applied detached that ends up
// without parent keeps no whiteouts or opaque xattrs (a bind mount of it
// would show them).
func TestDetachedBaseLosesMarkers(t *testing.T) {
	testutil.RequireRoot(t)
	s := newStack(t, 1)
	ctx := context.Background()
	tr := tarOf(t, whiteout("", "x"), dir("d"), opaque("d"), file("d/f", "f"), whiteout("", "d2"), dir("d2"))
	if err := Apply(ctx, s.dirs[0], bytes.NewReader(tr), Options{Detached: true, StateFile: s.state(0)}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(filepath.Join(s.dirs[0], "x")); err != nil {
		t.Fatalf("detached apply should write the whiteout: %v", err)
	}
	if err := Finish(ctx, s.dirs[0], s.state(0), nil); err != nil {
		t.Fatal(err)
	}
	got := tree(t, s.dirs[0])
	want := tree(t, applyNative(t, [][]ent{{whiteout("", "x"), dir("d"), opaque("d"), file("d/f", "f"), whiteout("", "d2"), dir("d2")}}))
	for _, d := range testutil.TreeDiff(want, got) {
		t.Error(d)
	}
}
