package layer

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// classCase is a hand-written sequence for one class of attack. Names and
// targets stay in the generator's vocabulary, so each is also a fuzz seed.
type classCase struct {
	name   string
	layers [][]ent
}

var classCases = []classCase{
	// (i) A hard link recorded for Finish (its target is in the parent),
	// then its parent turned into a symlink to a host directory: Finish
	// must not re-create the link through it.
	{"i-hardlink-parent-symlinked", [][]ent{
		{dir("a"), file("a/d", "data"), file("c", "data")},
		{hardlink("b/d", "a/d"), symlink("b", phDecoy),
			hardlink("d/c/d", "a/d"), symlink("d/c", "../../../../decoy"),
			dir("c"), symlink("a/b", "c"), hardlink("a/b/d", "a/d"), symlink("c", phSandbox)},
	}},
	{"i-detached-link-parent-symlinked", [][]ent{
		{dir("a"), file("a/d", "data")},
		// The target replaced after the link: the link gets its own copy.
		{hardlink("b/d", "a/d"), file("a/d", "other content\n"), symlink("b", phDecoy+"/a")},
	}},
	{"i-lower-symlink-parent", [][]ent{
		{dir("a"), file("a/d", "data"), symlink("b", phDecoy), symlink("c", "../../../decoy")},
		{hardlink("b/d", "a/d"), hardlink("c/a/c", "a/d")},
	}},
	// (ii) Directories implied by deep entries (metadata copied from the
	// parent at Finish), then a parent replaced by a symlink to outside.
	{"ii-implied-parent-symlinked", [][]ent{
		{dir("a").withMode(0o700).owned(1234, 5678).withXattr("user.foo", "bar"), dir("a/b").withMode(0o1777).owned(1, 2),
			file("a/b/c", "data"), dir("c").withMode(0o700), dir("c/a").withMode(0o600).owned(65534, 65534), dir("c/a/a").withMode(0o700)},
		{file("a/b/d", "data"), symlink("a", phDecoy),
			file("c/a/a/d", "data"), symlink("c/a", "../../../decoy"),
			symlink("d", "c"), file("d/a/c", "data"), symlink("c", "/decoy")},
	}},
	// (iii) Whiteouts and opaque directories in a base layer, then their
	// parent replaced by a symlink: Finish(nil) removes the markers, and
	// must not remove the decoy's 0/0 devices, .wh. files or opaque xattrs.
	{"iii-base-markers-parent-symlinked", [][]ent{
		{dir("a"), whiteout("a", "b"), whiteout("a", "c"), dir("c/a"), opaque("c/a"), dir("d"), opaque("d"), whiteout("d/a", "b"),
			symlink("a", phDecoy), symlink("c", "../../../decoy"), symlink("d", "/")},
		{file("b", "data")},
	}},
	// (iv) Directory times are set at the end; the directory's parent was
	// replaced by a symlink to outside meanwhile.
	{"iv-dir-times-parent-symlinked", [][]ent{
		{dir("a"), dir("a/b"), dir("a/c"), symlink("a", "../../../decoy"),
			dir("b"), dir("b/a"), dir("b/a/a"), symlink("b", "/decoy"),
			dir("c"), dir("c/d"), symlink("c", phSandbox)},
		{dir("d"), dir("d/b"), symlink("d", phDecoy)},
	}},
	// (v) Stale resolution: l -> x, l/f1, l replaced by another symlink (or
	// a directory), l/f2 must follow the new l.
	{"v-stale-symlink-replaced", [][]ent{
		{dir("b"), dir("c")},
		{symlink("a", "b"), file("a/d", "data"), symlink("a", "c"), file("a/c", "other content\n"),
			symlink("d", "b"), file("d/a", "data"), dir("d"), file("d/b", "data")},
	}},
	{"v-stale-chain-retargeted", [][]ent{
		{dir("b")},
		{symlink("c", "b"), symlink("a", "c"), file("a/a", "data"), symlink("c", "../../../decoy"), file("a/b", "data"),
			symlink("c", "d"), file("a/c", "data")},
	}},
	// (vi) Hard links and symlinks through symlinked parents.
	{"vi-links-through-symlinks", [][]ent{
		{dir("b"), file("b/c", "data")},
		{symlink("a", "b"), file("a/d", "data"), hardlink("c", "a/c"), hardlink("a/a", "a/d"),
			symlink("d", "../../.."), file("d/b/b", "data"), hardlink("d/b/d", "d/b/c"), symlink("a/c", "../../../..")},
	}},
	{"vi-links-through-escaping-symlinks", [][]ent{
		{dir("b"), file("b/c", "data"), symlink("d", "/")},
		{hardlink("d/c", "../../../decoy/a/d"), hardlink("c", "/decoy/a/d"), hardlink("a", phDecoy+"/a/d"),
			symlink("b/a", phSandbox), hardlink("b/a/c", "b/c"), symlink("b/b", "/a"), hardlink("b/b/d", "d/b/c"),
			symlink("d/a", "../../../../decoy"), file("d/a/d", "data"), hardlink("d/a/b", "b/c")},
	}},
	// (vii) Hostile xattrs in tar headers: overlay markers in every
	// namespace fuse-overlayfs or the kernel reads.
	{"vii-hostile-xattrs", [][]ent{
		{dir("a"), file("a/b", "data"), dir("c"), file("c/d", "data"), dir("d"), file("d/b", "data")},
		{dir("a").withXattr("user.fuseoverlayfs.opaque", "y"), dir("c").withXattr("trusted.overlay.opaque", "y"),
			file("b", "data").withXattr("user.fuseoverlayfs.override_stat", "0:0:04755"), dir("d").withXattr("user.overlay.opaque", "y"),
			file("d/a", "data").withXattr("user.overlay.redirect", "/decoy"), file("a/c", "data").withXattr("user.foo", "bar"),
			dir("c/a").withXattr("user.overlay.whiteout", "y"), file("c/a/b", "data").withXattr("user.fuseoverlayfs.origin", "x")},
	}},
}

// failure of one sequence in one mode.
type failure struct {
	kind    string // "containment" (escapes, panics, hangs) or "view" (differs from containerd's extraction)
	details []string
}

// check runs layers in sp and judges: containment always; the view through
// fuse-overlayfs against nat when given, usable, and our apply succeeded.
func (h *harness) check(layers [][]ent, sp runSpec, nat *nativeResult) *failure {
	h.tb.Helper()
	o := h.run(layers, sp, nat != nil && nat.usable)
	if len(o.problems) > 0 {
		return &failure{"containment", o.problems}
	}
	if errors.Is(o.viewErr, unix.ENOMEM) {
		// fuse-overlayfs 1.10 fails to list a directory over a lower
		// symlink that points to itself, whatever wrote the layers (seen
		// with hand-made directories too): nothing to compare.
		h.tb.Logf("not compared: fuse-overlayfs 1.10 cannot list this stack: %v", o.viewErr)
		return nil
	}
	if o.viewErr != nil {
		return &failure{"view", []string{fmt.Sprintf("reading through fuse-overlayfs: %v", o.viewErr)}}
	}
	if o.view == nil {
		return nil
	}
	if d := testutil.TreeDiff(comparableView(nat.tree, true), comparableView(o.view, false)); len(d) > 0 {
		return &failure{"view", d}
	}
	return nil
}

// shrink drops layers and entries one at a time while the failure of the
// same kind persists, within budget.
func (h *harness) shrink(layers [][]ent, sp runSpec, kind string, budget time.Duration) [][]ent {
	deadline := time.Now().Add(budget)
	fails := func(c [][]ent) bool {
		var nat *nativeResult
		if kind == "view" {
			n := h.native(c)
			if !n.usable {
				return false
			}
			nat = &n
		}
		f := h.check(c, sp, nat)
		return f != nil && f.kind == kind
	}
	cur := layers
	for progress := true; progress; {
		progress = false
		for li := 0; li < len(cur) && len(cur) > 1; li++ {
			if time.Now().After(deadline) {
				return cur
			}
			cand := append(append([][]ent{}, cur[:li]...), cur[li+1:]...)
			if fails(cand) {
				cur, progress = cand, true
				li--
			}
		}
		for li := range cur {
			for ei := 0; ei < len(cur[li]); ei++ {
				if time.Now().After(deadline) {
					return cur
				}
				cand := append([][]ent{}, cur...)
				cand[li] = append(append([]ent{}, cur[li][:ei]...), cur[li][ei+1:]...)
				if fails(cand) {
					cur, progress = cand, true
					ei--
				}
			}
		}
	}
	return cur
}

func firstLines(d []string, n int) string {
	if len(d) > n {
		d = append(d[:n:n], fmt.Sprintf("... and %d more", len(d)-n))
	}
	return strings.Join(d, "\n\t")
}

func envInt(t *testing.T, name string, def int) int {
	t.Helper()
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatalf("%s=%q: %v", name, s, err)
	}
	return n
}

// TestContainment applies hand-written sequences, one per class of attack,
// and generated ones (CONTAIN_SEEDS of them, default 200, from the seed
// CONTAIN_SEED or a new one) in every mode (sequential; detached and
// finished; detached base) and both whiteout forms. Whatever Apply and
// Finish return, nothing outside the layer being written may change (the
// decoys, the lower layers, the rest of the sandbox; see sandbox_test.go)
// and nothing may panic. Where containerd's own extraction and ours both
// succeed, the tree seen through fuse-overlayfs equals containerd's.
// Failures are shrunk (CONTAIN_SHRINK of them per kind, default 3) and
// printed as Go source.
//
// Not compared with containerd's extraction (containment is still checked):
// sequences it refuses (as a pull would fail), where it changed its own
// sandbox outside its directory, where it departs from the layer format (an
// opaque marker also removes the parents it made for entries of the same
// layer) and where an overlay cannot do as one directory does (a hard link
// entry's metadata reaching the other names a lower inode has in the lower
// layers): see containerdQuirks. Left out of the comparison: overlay marker xattrs and
// containerd's 0/0 character devices (comparableView). Names stay short:
// fuse-overlayfs 1.10 refuses names of 252 to 255 bytes.
// containBaseSeed is the first seed TestContainment's random part runs.
const containBaseSeed = 20261127

func TestContainment(t *testing.T) {
	testutil.RequireFUSE(t)
	t.Cleanup(func() { testutil.RequireNoLeftovers(t, "TestContainment") })
	h := newHarness(t)
	if f := h.forms["privileged"]; !f.DeviceWhiteouts || f.OpaqueXattr != OpaqueXattrTrusted {
		t.Fatalf("as root, probe found %+v", f)
	}
	shrinkN := envInt(t, "CONTAIN_SHRINK", 3)

	t.Run("class", func(t *testing.T) {
		for _, c := range classCases {
			t.Run(c.name, func(t *testing.T) {
				h.tb = t
				nat := h.native(c.layers)
				if !nat.usable {
					t.Logf("not compared with containerd's extraction: %s", nat.whyNot)
				}
				for _, sp := range allSpecs() {
					if f := h.check(c.layers, sp, &nat); f != nil {
						t.Errorf("%s: %s:\n\t%s", sp, f.kind, firstLines(f.details, 12))
					}
				}
				if t.Failed() {
					t.Logf("layers:\n%s", formatLayers(c.layers))
				}
			})
		}
	})

	t.Run("random", func(t *testing.T) {
		h.tb = t
		// A fixed base by default, so that make test is repeatable; set
		// CONTAIN_SEED (a number, or "new" for the clock) to explore.
		base := int64(containBaseSeed)
		switch s := os.Getenv("CONTAIN_SEED"); s {
		case "":
			t.Logf("seed %d (CONTAIN_SEED=new explores others)", base)
		case "new":
			t.Setenv("CONTAIN_SEED", "")
			base = testutil.Seed(t, "CONTAIN_SEED")
		default:
			base = testutil.Seed(t, "CONTAIN_SEED")
		}
		n := envInt(t, "CONTAIN_SEEDS", 200)
		type found struct {
			seed int64
			sp   runSpec
			f    *failure
		}
		var fails []found
		notCompared, viewDiffs := 0, 0
		// Differences from containerd's extraction fail the test; for an
		// exploration, CONTAIN_REPORT_ONLY=1 lists them instead.
		strict := os.Getenv("CONTAIN_REPORT_ONLY") == ""
		start := time.Now()
		for i := range n {
			seed := base + int64(i)
			layers := genLayers(newPCGChooser(seed))
			nat := h.native(layers)
			if !nat.usable {
				notCompared++
				if nat.escaped {
					t.Logf("seed %d: %s; not compared with it", seed, nat.whyNot)
				}
			}
			for _, sp := range allSpecs() {
				f := h.check(layers, sp, &nat)
				switch {
				case f == nil:
				case f.kind == "view" && !strict:
					viewDiffs++
					t.Logf("seed %d %s: differs from containerd's extraction: %s", seed, sp, f.details[0])
				default:
					fails = append(fails, found{seed, sp, f})
					t.Errorf("seed %d %s: %s: %s", seed, sp, f.kind, f.details[0])
				}
			}
		}
		t.Logf("%d sequences in %v (%d not compared with containerd's extraction: it refused, escaped or has a quirk there; %d runs differ from it)",
			n, time.Since(start).Round(time.Millisecond), notCompared, viewDiffs)
		shrunk := map[string]int{}
		seen := map[string]bool{}
		for _, fd := range fails {
			key := fmt.Sprintf("%d/%s", fd.seed, fd.f.kind)
			if shrunk[fd.f.kind] >= shrinkN || seen[key] {
				continue
			}
			shrunk[fd.f.kind]++
			seen[key] = true
			layers := genLayers(newPCGChooser(fd.seed))
			small := h.shrink(layers, fd.sp, fd.f.kind, 30*time.Second)
			var nat *nativeResult
			if fd.f.kind == "view" {
				n := h.native(small)
				nat = &n
			}
			details := fd.f.details
			if f := h.check(small, fd.sp, nat); f != nil {
				details = f.details
			}
			t.Errorf("seed %d %s: %s (replay: CONTAIN_SEED=%d CONTAIN_SEEDS=1); shrunk from %d to %d entries:\n%s\n\t%s",
				fd.seed, fd.sp, fd.f.kind, fd.seed, countEntries(layers), countEntries(small), formatLayers(small), firstLines(details, 12))
		}
	})
}

// TestContainmentHarness: the containment check sees what it must (each
// fake operation below changes one thing outside the layer) and nothing
// else (reading decoys and the lower layer, writing the layer and its state
// file).
func TestContainmentHarness(t *testing.T) {
	testutil.RequireRoot(t)
	h := newHarness(t)
	s, err := prepareSandbox(h.sandboxDir(), 2)
	if err != nil {
		t.Fatal(err)
	}
	lowerFile := filepath.Join(s.dirs[0], "f")
	if err := os.WriteFile(lowerFile, []byte("lower"), 0o644); err != nil {
		t.Fatal(err)
	}
	upper := s.dirs[1]
	decoy := filepath.Join(s.root, "decoy") // the host path: it works in the chroot too
	read := func() error {
		for _, p := range []string{"/decoy/d", decoy + "/a/d", "/d", lowerFile} {
			if _, err := os.ReadFile(p); err != nil {
				return err
			}
		}
		for _, p := range []string{"/decoy", "/decoy/a", s.dirs[0], "/"} {
			if _, err := os.ReadDir(p); err != nil {
				return err
			}
		}
		if _, err := os.Readlink("/decoy/sym"); err != nil {
			return err
		}
		if _, err := getXattr("/decoy/a", OpaqueXattrTrusted); err != nil {
			return err
		}
		if err := os.WriteFile(upper+"/new", []byte("x"), 0o644); err != nil {
			return err
		}
		if err := os.Mkdir(upper+"/dir", 0o755); err != nil {
			return err
		}
		return os.WriteFile(StateFile(filepath.Dir(upper)), []byte("{}"), 0o600)
	}
	for _, c := range []struct {
		name string
		fn   func() error
		want string // in a reported problem; "" for none
	}{
		{"reads, and writes to the layer", read, ""},
		{"chmod and back", func() error {
			if err := os.Chmod("/decoy/d", 0o777); err != nil {
				return err
			}
			return os.Chmod("/decoy/d", 0o600)
		}, "decoy/d: ctime"},
		{"times through an absolute path", func() error {
			return os.Chtimes("/decoy/a/d", testTime, testTime)
		}, "decoy/a/d: atime"},
		{"times of a symlink", func() error {
			return unix.UtimesNanoAt(unix.AT_FDCWD, "/sym", []unix.Timespec{{Sec: 1}, {Sec: 1}}, unix.AT_SYMLINK_NOFOLLOW)
		}, "sym: atime"},
		{"create at the root", func() error { return os.WriteFile("/evil", nil, 0o644) }, "evil: appeared"},
		{"xattr removed", func() error { return unix.Lremovexattr("/decoy/a", OpaqueXattrTrusted) }, "decoy/a: xattrs"},
		{"hard link to a decoy", func() error { return os.Link("/decoy/d", upper+"/l") }, "decoy/d: nlink"},
		{"lower layer written", func() error { return os.WriteFile(lowerFile, []byte("changed"), 0o644) }, "snapshots/1/fs/f: content"},
		{"decoy removed", func() error { return os.Remove(decoy + "/fifo") }, "decoy/fifo: removed"},
		{"owner", func() error { return os.Lchown("/c", 0, 0) }, "c: owner"},
		{"panic", func() error { panic("boom") }, "panic: boom"},
	} {
		var out outcome
		h.op(s, &out, c.name, 1, c.fn)
		got := strings.Join(out.problems, "\n")
		switch {
		case c.want == "" && (len(out.problems) > 0 || len(out.returned) > 0):
			t.Errorf("%s: reported %q, returned %q", c.name, got, out.returned)
		case c.want != "" && !strings.Contains(got, c.want):
			t.Errorf("%s: want a problem with %q, got %q (returned %q)", c.name, c.want, got, out.returned)
		}
	}
}

func countEntries(layers [][]ent) int {
	n := 0
	for _, l := range layers {
		n += len(l)
	}
	return n
}

// TestGrammarEncoding: the class cases encode to bytes from which the
// generator makes them again, and generation is deterministic.
func TestGrammarEncoding(t *testing.T) {
	for _, c := range classCases {
		data, err := encodeLayers(c.layers)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		got := genLayers(&byteChooser{data: data})
		if formatLayers(got) != formatLayers(c.layers) {
			t.Errorf("%s: decodes to\n%s\nwant\n%s", c.name, formatLayers(got), formatLayers(c.layers))
		}
	}
	for seed := int64(0); seed < 50; seed++ {
		rec := &recordingChooser{c: newPCGChooser(seed)}
		a := formatLayers(genLayers(rec))
		if b := formatLayers(genLayers(newPCGChooser(seed))); a != b {
			t.Fatalf("seed %d: generation not deterministic", seed)
		}
		if b := formatLayers(genLayers(&byteChooser{data: rec.w.b})); a != b {
			t.Fatalf("seed %d: recorded bytes replay to\n%s\nwant\n%s", seed, b, a)
		}
	}
}

// FuzzContainment drives the generator with the fuzzer's bytes (the first
// one picks the mode and whiteout form) and checks containment around each
// Apply and Finish; no fuse-overlayfs mount, to keep executions fast.
func FuzzContainment(f *testing.F) {
	specs := allSpecs()
	for _, c := range classCases {
		data, err := encodeLayers(c.layers)
		if err != nil {
			f.Fatalf("%s: %v", c.name, err)
		}
		for i := range specs {
			f.Add(append([]byte{byte(i)}, data...))
		}
	}
	for seed := int64(1); seed <= 8; seed++ {
		rec := &recordingChooser{c: newPCGChooser(seed)}
		genLayers(rec)
		f.Add(append([]byte{byte(seed)}, rec.w.b...))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		testutil.RequireRoot(t)
		if len(data) == 0 {
			return
		}
		sp := specs[int(data[0])%len(specs)]
		layers := genLayers(&byteChooser{data: data[1:]})
		h := newHarness(t)
		if o := h.run(layers, sp, false); len(o.problems) > 0 {
			t.Errorf("%s: containment:\n\t%s\nlayers:\n%s", sp, firstLines(o.problems, 12), formatLayers(layers))
		}
	})
}
