package layer

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/pkg/archive"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// capNetBind is a file capability (struct vfs_cap_data, revision 2,
// little-endian): cap_net_bind_service in the permitted set.
const capNetBind = "\x00\x00\x00\x02\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"

// capSysTime is another one (cap_sys_time permitted, effective flag set).
const capSysTime = "\x01\x00\x00\x02\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"

func withCap(e ent, v string) ent {
	x := map[string]string{}
	for k, w := range e.xattrs {
		x[k] = w
	}
	x[xattrCapability] = v
	e.xattrs = x
	return e
}

// forceMetaCalls makes the package use the given form of metadata calls
// until the test ends.
func forceMetaCalls(t *testing.T, c int32) {
	old := metaCalls.Swap(c)
	t.Cleanup(func() { metaCalls.Store(old) })
}

var metaForms = []struct {
	name  string
	calls int32
}{{"fchmodat2", callsEmptyPath}, {"proc-fd", callsProc}}

// treeTimes gives the access and modification times of every entry under
// root but root itself.
func treeTimes(t *testing.T, root string) map[string]string {
	t.Helper()
	out, err := testutil.Tree(root, testutil.TreeOpts{Fields: testutil.TreeTimes, SkipRoot: true})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// metaLayer has an entry of every type with its own owner, mode, xattrs
// and times, and hard links that name a symlink, a FIFO and a device.
func metaLayer() []ent {
	es := []ent{
		dir("d").withMode(0o751).owned(11, 12).withXattr("user.d", "1"),
		dir("d/e").withMode(0o1777).owned(13, 14),
		file("d/f", "body").withMode(0o4750).owned(15, 16).withXattr("user.f", "2"),
		withCap(file("cap", "x").withMode(0o755), capNetBind),
		symlink("d/s", "../nowhere").owned(17, 18),
		{name: "fifo", typ: tar.TypeFifo, mode: 0o640, uid: 19, gid: 20},
		ent{name: "chr", typ: tar.TypeChar, mode: 0o620, uid: 21, gid: 22}.withDev(1, 3),
		ent{name: "blk", typ: tar.TypeBlock, mode: 0o2660, uid: 23, gid: 24}.withDev(7, 5),
		hardlink("ls", "d/s").withMode(0o777).owned(25, 26),
		hardlink("lfifo", "fifo").withMode(0o604).owned(27, 28),
		hardlink("lchr", "chr").withMode(0o600),
		dir("d").withMode(0o705).owned(29, 30), // kept, metadata replaced
	}
	return es
}

// TestMetaOnHandles: with either form of metadata calls (fchmodat2 and
// AT_EMPTY_PATH on the handle; the /proc/self/fd fallback of kernels before
// 6.6), every entry type gets the owner, mode, xattrs and times containerd's
// extraction gives it.
func TestMetaOnHandles(t *testing.T) {
	testutil.RequireRoot(t)
	layers := [][]ent{metaLayer()}
	want := applyNative(t, layers)
	wantTimes := treeTimes(t, want) // first: reading changes atimes
	wantTree := tree(t, want)
	for _, f := range metaForms {
		t.Run(f.name, func(t *testing.T) {
			forceMetaCalls(t, f.calls)
			if emptyPathCalls() != (f.calls == callsEmptyPath) {
				t.Fatalf("metaCalls not forced to %s", f.name)
			}
			s := applyOurs(t, layers, ProbeForms(t.TempDir()), false)
			got := s.dirs[0]
			for _, d := range testutil.TreeDiff(wantTimes, treeTimes(t, got)) {
				t.Errorf("times: %s", d)
			}
			for _, d := range testutil.TreeDiff(wantTree, tree(t, got)) {
				t.Errorf("tree: %s", d)
			}
		})
	}
}

// TestMetaCallsProbe: this kernel's form is found. fchmodat2 came with
// Linux 6.6.
func TestMetaCallsProbe(t *testing.T) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		t.Fatal(err)
	}
	rel := unix.ByteSliceToString(u.Release[:])
	var major, minor int
	if _, err := fmt.Sscanf(rel, "%d.%d", &major, &minor); err != nil {
		t.Fatalf("kernel release %q: %v", rel, err)
	}
	got := probeMetaCalls()
	if want := major > 6 || (major == 6 && minor >= 6); want != (got == callsEmptyPath) {
		t.Errorf("kernel %s: probe found fchmodat2 %v", rel, got == callsEmptyPath)
	}
}

// capCases: hard links to files with a file capability. containerd's
// extraction lchowns every entry, and the kernel clears
// security.capability (and S_ISUID; S_ISGID when group-executable) of a
// non-directory on chown, even to the same owner; the lchmod after it puts
// the mode back. So a hard-link entry drops the capability of the inode it
// names unless the entry carries one itself.
var capCases = []struct {
	name   string
	layers [][]ent
}{
	{"same-header", [][]ent{{withCap(file("f", "x").withMode(0o755), capNetBind), hardlink("l", "f").withMode(0o755)}}},
	{"setuid-setgid", [][]ent{{withCap(file("f", "x").withMode(0o6755).owned(5, 6), capNetBind), hardlink("l", "f").withMode(0o6755).owned(5, 6)}}},
	{"other-owner", [][]ent{{withCap(file("f", "x").withMode(0o755), capNetBind), hardlink("l", "f").withMode(0o700).owned(7, 8)}}},
	{"link-carries-cap", [][]ent{{withCap(file("f", "x").withMode(0o755), capNetBind), withCap(hardlink("l", "f").withMode(0o755), capSysTime)}}},
	{"link-carries-xattr", [][]ent{{withCap(file("f", "x").withMode(0o755), capNetBind), hardlink("l", "f").withMode(0o755).withXattr("user.x", "1")}}},
	{"many-links", [][]ent{{withCap(file("f", "x").withMode(0o755), capNetBind), hardlink("l1", "f").withMode(0o755),
		withCap(hardlink("l2", "f").withMode(0o755), capSysTime), hardlink("l3", "l1").withMode(0o755)}}},
	{"cap-after-link", [][]ent{{file("f", "x").withMode(0o755), hardlink("l", "f").withMode(0o755), withCap(file("g", "y").withMode(0o755), capNetBind)}}},
	{"fifo", [][]ent{{withCap(ent{name: "p", typ: tar.TypeFifo, mode: 0o644}, capNetBind), hardlink("l", "p")}}},
	{"lower-target", [][]ent{{withCap(file("d/f", "x").withMode(0o755), capNetBind)}, {hardlink("l", "d/f").withMode(0o755)}}},
}

// TestHardLinkDropsCapability: our tree equals containerd's extraction of
// the same tars, security.capability included; with lowers (sequential,
// and detached then finished) the layer holding the link has no
// capability left on it either.
func TestHardLinkDropsCapability(t *testing.T) {
	testutil.RequireRoot(t)
	for _, c := range capCases {
		t.Run(c.name, func(t *testing.T) {
			want := tree(t, applyNative(t, c.layers))
			if len(c.layers) == 1 {
				for _, f := range metaForms {
					forceMetaCalls(t, f.calls)
					got := tree(t, applyOurs(t, c.layers, ProbeForms(t.TempDir()), false).dirs[0])
					for _, d := range testutil.TreeDiff(want, got) {
						t.Errorf("%s: %s", f.name, d)
					}
				}
				return
			}
			for _, detached := range []bool{false, true} {
				s := applyOurs(t, c.layers, ProbeForms(t.TempDir()), detached)
				top := tree(t, s.dirs[len(s.dirs)-1])
				for rel, w := range want {
					g, ok := top[rel]
					if ok && strings.Contains(g, "type=100000") && g != w {
						t.Errorf("detached %v: %s: got %s, want %s", detached, rel, g, w)
					}
				}
				if !strings.Contains(top["l"], "owner=0:0") || strings.Contains(top["l"], xattrCapability) {
					t.Errorf("detached %v: link l is %q, want no capability", detached, top["l"])
				}
			}
		})
	}
}

// TestHardLinkCapabilityChecks: the capability is looked for once per
// remembered target, not once per link: a layer of many links to one file
// (busybox) pays one lookup.
func TestHardLinkCapabilityChecks(t *testing.T) {
	testutil.RequireRoot(t)
	es := []ent{file("f", "x").withMode(0o755)}
	for i := range 200 {
		es = append(es, hardlink("l"+strconv.Itoa(i), "f").withMode(0o755))
	}
	root := newStack(t, 1).dirs[0]
	before := capLookups.Load()
	if err := Apply(context.Background(), root, bytes.NewReader(tarBytes(t, es)), Options{}); err != nil {
		t.Fatal(err)
	}
	if n := capLookups.Load() - before; n != 1 {
		t.Errorf("%d capability lookups for 200 links to one file, want 1", n)
	}
}

// TestRefusedEntryTypes: contiguous files and hard links to a whiteout
// name are refused as invalid, naming the entry, before anything in the
// layer changes; containerd's extraction refuses both too. Entries named
// .wh.* stay whiteouts whatever their type.
func TestRefusedEntryTypes(t *testing.T) {
	testutil.RequireRoot(t)
	cases := []struct {
		name   string
		lowers [][]ent // applied first, file-form whiteouts
		layer  []ent
		entry  string // the refused entry's name
	}{
		{"contiguous", nil, []ent{file("x", "keep"), {name: "x", typ: tar.TypeCont, mode: 0o644}}, "x"},
		{"link-to-whiteout-same-layer", nil, []ent{file("a", "1"), file("l", "keep"), whiteout("", "a"), hardlink("l", ".wh.a")}, "l"},
		{"link-to-opaque-marker", nil, []ent{dir("d"), file("l", "keep"), opaque("d"), hardlink("l", "d/.wh..wh..opq")}, "l"},
		{"link-to-lower-whiteout", [][]ent{{file("a", "1"), file("b", "2")}, {whiteout("", "a")}}, []ent{file("l", "keep"), hardlink("l", ".wh.a")}, "l"},
		{"link-to-lower-whiteout-dotted", [][]ent{{dir("d"), file("d/a", "1")}, {whiteout("d", "a")}}, []ent{file("l", "keep"), hardlink("l", "./d/../d/.wh.a")}, "l"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			for _, forms := range []Forms{FallbackForms, ProbeForms(t.TempDir())} {
				s := newStack(t, len(c.lowers)+1)
				ctx := context.Background()
				for i, l := range c.lowers {
					if err := Apply(ctx, s.dirs[i], bytes.NewReader(tarBytes(t, l)), Options{Lowers: s.lowers(i), Forms: &forms}); err != nil {
						t.Fatal(err)
					}
				}
				top := len(c.lowers)
				err := Apply(ctx, s.dirs[top], bytes.NewReader(tarBytes(t, c.layer)), Options{Lowers: s.lowers(top), Forms: &forms})
				if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), strconv.Quote(c.entry)) {
					t.Errorf("%+v: got %v, want invalid argument naming %q", forms, err, c.entry)
				}
				if b, rerr := os.ReadFile(filepath.Join(s.dirs[top], c.entry)); string(b) != "keep" {
					t.Errorf("%+v: %s is %q (%v), want it kept", forms, c.entry, b, rerr)
				}
			}
			// containerd, all layers in one directory.
			dir := t.TempDir()
			var err error
			for _, l := range append(append([][]ent(nil), c.lowers...), c.layer) {
				if _, err = archive.Apply(context.Background(), dir, bytes.NewReader(tarBytes(t, l))); err != nil {
					break
				}
			}
			if err == nil {
				t.Errorf("containerd's extraction took it")
			}
		})
	}
	t.Run("whiteout-named-link", func(t *testing.T) {
		s := newStack(t, 2)
		ctx := context.Background()
		if err := Apply(ctx, s.dirs[0], bytes.NewReader(tarOf(t, file("a", "1"))), Options{}); err != nil {
			t.Fatal(err)
		}
		l := []ent{hardlink(".wh.a", ".wh.b"), {name: ".wh.c", typ: tar.TypeCont}}
		if err := Apply(ctx, s.dirs[1], bytes.NewReader(tarBytes(t, l)), Options{Lowers: s.lowers(1)}); err != nil {
			t.Fatalf("whiteouts of other types: %v", err)
		}
		var st unix.Stat_t
		if err := unix.Lstat(filepath.Join(s.dirs[1], "a"), &st); err != nil || !isWhiteoutDev(&st) {
			t.Errorf("a is not whited out: %v", err)
		}
		if _, err := archive.Apply(ctx, t.TempDir(), bytes.NewReader(tarBytes(t, l))); err != nil {
			t.Errorf("containerd's extraction refused it: %v", err)
		}
	})
}

// TestKernelChownRules checks the kernel rules linkMeta relies on: chown
// of a non-directory, even to its own owner, clears security.capability
// and S_ISUID, and S_ISGID when group-executable; chmod clears nothing;
// a directory keeps all.
func TestKernelChownRules(t *testing.T) {
	testutil.RequireRoot(t)
	dir := t.TempDir()
	cases := []struct {
		name     string
		mode     uint32
		wantMode uint32
	}{
		{"f755", 0o755, 0o755}, {"f4755", 0o4755, 0o755}, {"f2755", 0o2755, 0o755},
		{"f2745", 0o2745, 0o2745}, {"f6711", 0o6711, 0o711}, {"f4644", 0o4644, 0o644},
	}
	for _, c := range cases {
		p := filepath.Join(dir, c.name)
		if err := os.WriteFile(p, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
		mustNil(t, unix.Lsetxattr(p, xattrCapability, []byte(capNetBind), 0))
		mustNil(t, unix.Chmod(p, c.mode))
		if !hasCapAt(t, p) {
			t.Fatalf("%s: chmod cleared the capability", c.name)
		}
		mustNil(t, unix.Lchown(p, 0, 0))
		var st unix.Stat_t
		mustNil(t, unix.Lstat(p, &st))
		if st.Mode&0o7777 != c.wantMode || hasCapAt(t, p) {
			t.Errorf("%s after chown: mode %o capability %v, want mode %o and none", c.name, st.Mode&0o7777, hasCapAt(t, p), c.wantMode)
		}
	}
	d := filepath.Join(dir, "d")
	mustNil(t, os.Mkdir(d, 0o755))
	mustNil(t, unix.Chmod(d, 0o6755))
	mustNil(t, unix.Lsetxattr(d, xattrCapability, []byte(capNetBind), 0))
	mustNil(t, unix.Lchown(d, 0, 0))
	var st unix.Stat_t
	mustNil(t, unix.Lstat(d, &st))
	if st.Mode&0o7777 != 0o6755 || !hasCapAt(t, d) {
		t.Errorf("directory after chown: mode %o capability %v, want both kept", st.Mode&0o7777, hasCapAt(t, d))
	}
}

func hasCapAt(t *testing.T, p string) bool {
	t.Helper()
	_, err := unix.Lgetxattr(p, xattrCapability, nil)
	if err != nil && !errors.Is(err, unix.ENODATA) {
		t.Fatal(err)
	}
	return err == nil
}

func mustNil(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
