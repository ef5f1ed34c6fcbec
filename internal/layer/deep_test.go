package layer

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/pkg/archive"
	"github.com/containerd/errdefs"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// deepChain names the directory at depth (components "d").
func deepChain(depth int) string {
	return strings.TrimSuffix(strings.Repeat("d/", depth), "/")
}

// deepLayers is a lower layer holding a chain of directories depth deep
// (every directory listed, one file in each) and an upper layer that adds
// files files to the deepest directory and to a new directory below it,
// with the chain implied (not listed), as a tar of a deep tree made by
// another tool may be.
func deepLayers(depth, files int) [][]ent {
	var lower []ent
	for i := 1; i <= depth; i++ {
		c := deepChain(i)
		lower = append(lower, dir(c), file(c+"/low", "x"))
	}
	deep := deepChain(depth)
	var upper []ent
	for i := 0; i < files; i++ {
		upper = append(upper, file(fmt.Sprintf("%s/f%d", deep, i), "y"))
	}
	for i := 0; i < files; i++ {
		upper = append(upper, file(fmt.Sprintf("%s/new/g%d", deep, i), "z"))
	}
	return [][]ent{lower, upper}
}

// BenchmarkDeepPaths applies a deep layer over a deep lower: ours
// sequentially, ours detached and then finished over the lower, and
// containerd's archive.Apply of the same tars into one directory.
func BenchmarkDeepPaths(b *testing.B) {
	testutil.RequireRoot(b)
	ctx := context.Background()
	for _, depth := range []int{100, 200, 400, 800} {
		b.Run(fmt.Sprintf("depth%d", depth), func(b *testing.B) { benchDeep(b, ctx, depth) })
	}
}

func benchDeep(b *testing.B, ctx context.Context, depth int) {
	layers := deepLayers(depth, 8)
	benchOverLower(b, ctx, tarBytes(b, layers[0]), tarBytes(b, layers[1]), &FallbackForms, []string{"apply", "finish", "containerd"},
		func(mode, snap, upper, lower string, upperTar []byte) error {
			switch mode {
			case "apply":
				return Apply(ctx, upper, bytes.NewReader(upperTar), Options{Lowers: []string{lower}, Forms: &FallbackForms})
			case "finish":
				if err := Apply(ctx, upper, bytes.NewReader(upperTar), Options{Detached: true, StateFile: StateFile(snap), Forms: &FallbackForms}); err != nil {
					return err
				}
				return Finish(ctx, upper, StateFile(snap), []string{lower})
			}
			_, err := archive.Apply(ctx, upper, bytes.NewReader(upperTar))
			return err
		})
}

// TestLinkThroughChangedSymlink generates hard links made through a
// symlink that the layer then changes (replaced by another symlink or a
// directory, whited out, a lower one shadowed) before a second link by the
// same name: each link must land where containerd's extraction puts it,
// through the path as it is when the link is applied (issue 19, item 11).
func TestLinkThroughChangedSymlink(t *testing.T) {
	testutil.RequireFUSE(t)
	t.Cleanup(func() { testutil.RequireNoLeftovers(t, "TestLinkThroughChangedSymlink") })
	changes := map[string][]ent{
		"relink":           {symlink("s", "e")},
		"dir":              {dir("s"), file("s/t", "in s")},
		"whiteout":         {whiteout("", "s")},
		"whiteout+relink":  {whiteout("", "s"), symlink("s", "e")},
		"remove+dir+relnk": {dir("s"), file("s/t", "in s"), whiteout("", "s"), symlink("s", "./e")},
	}
	cases := 0
	for _, first := range []string{"lower", "upper"} {
		for cname, change := range changes {
			for _, targets := range []string{"lower", "upper"} {
				targetEnts := []ent{dir("d"), file("d/t", "in d"), dir("e"), file("e/t", "in e")}
				var lower, upper []ent
				lower = append(lower, file("base", "b"))
				if targets == "lower" {
					lower = append(lower, targetEnts...)
				} else {
					upper = append(upper, targetEnts...)
				}
				if first == "lower" {
					lower = append(lower, symlink("s", "d"))
				} else {
					upper = append(upper, symlink("s", "d"))
				}
				upper = append(upper, hardlink("l1", "s/t"))
				upper = append(upper, change...)
				upper = append(upper, hardlink("l2", "s/t"), hardlink("l3", "./s/../s/t"))
				layers := [][]ent{lower, upper}
				name := fmt.Sprintf("%s-symlink/%s/targets-in-%s", first, cname, targets)
				native, nerr := nativeTree(t, layers)
				for _, detached := range []bool{false, true} {
					cases++
					t.Run(fmt.Sprintf("%s/detached=%t", name, detached), func(t *testing.T) {
						s, err := applyOursErr(t, layers, FallbackForms, detached)
						if detached && errors.Is(err, errdefs.ErrFailedPrecondition) && first == "lower" && targets == "upper" {
							// The link went through the parents' symlink
							// into what the layer wrote, which it then
							// changed: refused, for a sequential apply.
							return
						}
						if nerr != nil || err != nil {
							if (nerr == nil) != (err == nil) {
								t.Fatalf("containerd: %v; ours: %v", nerr, err)
							}
							return
						}
						got := tree(t, mountStack(t, s))
						for _, d := range testutil.TreeDiff(native, got) {
							t.Error(d)
						}
					})
				}
			}
		}
	}
	t.Logf("%d cases", cases)
}

// nativeTree is what containerd's extraction makes of the layers, or why
// it failed.
func nativeTree(t *testing.T, layers [][]ent) (map[string]string, error) {
	t.Helper()
	d := filepath.Join(t.TempDir(), "native")
	if err := os.Mkdir(d, 0o755); err != nil {
		t.Fatal(err)
	}
	for i, l := range layers {
		if _, err := archive.Apply(context.Background(), d, bytes.NewReader(tarBytes(t, l))); err != nil {
			return nil, fmt.Errorf("layer %d: %w", i, err)
		}
	}
	return tree(t, d), nil
}

// applyOursErr is applyOurs returning the error instead of failing the
// test.
func applyOursErr(t *testing.T, layers [][]ent, forms Forms, detached bool) (*stack, error) {
	t.Helper()
	s := newStack(t, len(layers))
	ctx := context.Background()
	for i, l := range layers {
		opts := Options{Forms: &forms}
		if detached {
			opts.Detached, opts.StateFile = true, s.state(i)
		} else {
			opts.Lowers = s.lowers(i)
		}
		if err := Apply(ctx, s.dirs[i], bytes.NewReader(tarBytes(t, l)), opts); err != nil {
			return nil, fmt.Errorf("apply layer %d: %w", i, err)
		}
	}
	if detached {
		for i := range layers {
			if err := Finish(ctx, s.dirs[i], s.state(i), s.lowers(i)); err != nil {
				return nil, fmt.Errorf("finish layer %d: %w", i, err)
			}
		}
	}
	return s, nil
}

// deepCostLayers generates an upper layer over a lower chain depth deep:
// files in directories at random depths (many per directory), new
// directories below them, and hard links between deep files. It returns
// the tar entries and the directories they name (each new to the upper).
func deepCostLayers(seed int64, depth int) ([][]ent, int) {
	ch := newPCGChooser(seed)
	var lower []ent
	for i := 1; i <= depth; i++ {
		lower = append(lower, dir(deepChain(i)))
	}
	lower = append(lower, file(deepChain(depth)+"/low", "x"))
	var upper []ent
	dirs := map[string]bool{}
	note := func(name string) {
		for d := path2dir(name); d != ""; d = path2dir(d) {
			dirs[d] = true
		}
	}
	var files []string
	for k := 0; k < 12; k++ {
		at := deepChain(1 + ch.intn(depth))
		if ch.intn(2) == 0 {
			at += fmt.Sprintf("/n%d/m", k)
		}
		for i := 0; i < 1+ch.intn(20); i++ {
			name := fmt.Sprintf("%s/f%d.%d", at, k, i)
			upper = append(upper, file(name, "y"))
			files = append(files, name)
			note(name)
		}
		if len(files) > 1 {
			name := fmt.Sprintf("%s/l%d", at, k)
			upper = append(upper, hardlink(name, files[ch.intn(len(files)-1)]))
			note(name)
		}
	}
	upper = append(upper, hardlink(deepChain(depth)+"/lowlink", deepChain(depth)+"/low"))
	return [][]ent{lower, upper}, len(dirs)
}

func path2dir(name string) string {
	d, _ := splitDir(name)
	return d
}

// TestDeepPathCost bounds what deep paths cost, counting file system
// operations (no clock): applied over a lower chain, sequentially and
// detached then finished, a layer may cost a constant per entry plus a
// constant per directory it names, at depth 100 as near PATH_MAX (issue 19,
// items 4 and 5).
func TestDeepPathCost(t *testing.T) {
	testutil.RequireRoot(t)
	ctx := context.Background()
	for _, depth := range []int{100, 600, 2000} {
		for _, detached := range []bool{false, true} {
			layers, ndirs := deepCostLayers(int64(depth), depth)
			s := newStack(t, 2)
			if err := Apply(ctx, s.dirs[0], bytes.NewReader(tarBytes(t, layers[0])), Options{Forms: &FallbackForms}); err != nil {
				t.Fatal(err)
			}
			before := fsOps.Load()
			opts := Options{Forms: &FallbackForms, Lowers: s.lowers(1)}
			if detached {
				opts = Options{Forms: &FallbackForms, Detached: true, StateFile: s.state(1)}
			}
			err := Apply(ctx, s.dirs[1], bytes.NewReader(tarBytes(t, layers[1])), opts)
			applied := fsOps.Load() - before
			if err == nil && detached {
				err = Finish(ctx, s.dirs[1], s.state(1), s.lowers(1))
			}
			if err != nil {
				t.Fatalf("depth %d, detached %t: %v", depth, detached, err)
			}
			ops := fsOps.Load() - before
			entries := int64(len(layers[1]))
			bound := perEntryOps*entries + perDirOps*int64(ndirs)
			t.Logf("depth %d, detached %t: %d entries naming %d directories: %d operations (apply %d), bound %d", depth, detached, entries, ndirs, ops, applied, bound)
			if ops > bound {
				t.Errorf("depth %d, detached %t: %d operations for %d entries and %d directories, want at most %d (%d per entry and %d per directory)",
					depth, detached, ops, entries, ndirs, bound, perEntryOps, perDirOps)
			}
			if depth == 2000 {
				checkDeepTree(t, s.dirs[1], layers[1])
			}
		}
	}
}

// perDirOps bounds what making one directory of a path costs (looked up in
// the layer and each lower, copied up with its metadata).
const perDirOps = 40

// checkDeepTree checks that every file of the upper tar is in the layer.
func checkDeepTree(t *testing.T, layerDir string, upper []ent) {
	t.Helper()
	root, err := os.OpenRoot(layerDir)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = root.Close() }()
	for _, e := range upper {
		if _, err := root.Lstat(e.name); err != nil {
			t.Errorf("%.40s...: %v", e.name, err)
		}
	}
}

// countingCtx is a context cancelled after n calls of Err: a cancel that
// lands inside a long loop whatever the machine's speed.
type countingCtx struct {
	context.Context
	n     int
	calls int
}

func (c *countingCtx) Err() error {
	if c.calls++; c.calls > c.n {
		return context.Canceled
	}
	return nil
}

// TestFinishHonoursCancel cancels a Finish of a layer with many implied
// directories part way: it must return the context's error and stop,
// doing a fraction of the work a whole Finish does.
func TestFinishHonoursCancel(t *testing.T) {
	testutil.RequireRoot(t)
	var lower, upper []ent
	for i := 0; i < 400; i++ {
		lower = append(lower, dir(fmt.Sprintf("d%d", i)).withMode(0o711))
		upper = append(upper, file(fmt.Sprintf("d%d/f", i), "x"))
	}
	run := func(ctx context.Context) (int64, error) {
		s := newStack(t, 2)
		if err := Apply(context.Background(), s.dirs[0], bytes.NewReader(tarBytes(t, lower)), Options{Forms: &FallbackForms}); err != nil {
			t.Fatal(err)
		}
		if err := Apply(context.Background(), s.dirs[1], bytes.NewReader(tarBytes(t, upper)), Options{Forms: &FallbackForms, Detached: true, StateFile: s.state(1)}); err != nil {
			t.Fatal(err)
		}
		before := fsOps.Load()
		err := Finish(ctx, s.dirs[1], s.state(1), s.lowers(1))
		return fsOps.Load() - before, err
	}
	whole, err := run(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	ctx := &countingCtx{Context: context.Background(), n: 20}
	part, err := run(ctx)
	t.Logf("whole finish %d operations; cancelled after %d checks: %d operations, %v", whole, ctx.n, part, err)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled Finish returned %v, want %v", err, context.Canceled)
	}
	if part > whole/4 {
		t.Errorf("cancelled Finish went on: %d operations of %d for a whole one", part, whole)
	}
	if _, err := run(&countingCtx{Context: context.Background()}); !errors.Is(err, context.Canceled) {
		t.Errorf("Finish with a cancelled context returned %v", err)
	}
}
