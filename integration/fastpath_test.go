package integration

// End-to-end tests of the fuse-overlayfs differ (issue 4): layers written
// straight into the layer directories, sequentially and in parallel
// (max_concurrent_unpacks with the snapshotter's rebase capability).

import (
	"archive/tar"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/fosnap/fuseoverlayfs/integration/internal/harness"
	"github.com/fosnap/fuseoverlayfs/integration/internal/images"
)

// HardlinkDeleted is an image where a layer deletes a file that a lower
// layer hard-links, and an upper layer hard-links a file of a lower one.
func HardlinkDeleted(probe []byte) images.Spec {
	base := images.Layer{
		images.Dir("bin", 0o755),
		{Path: "bin/probe", Type: tar.TypeReg, Mode: 0o755, Body: probe},
		images.Dir("data", 0o755),
		images.File("data/orig", 0o640, "shared by two names\n"),
		images.Hardlink("data/link", "data/orig"),
		images.File("data/keep", 0o644, "linked from above\n"),
	}
	deletes := images.Layer{
		images.Dir("data", 0o755),
		images.Whiteout("data/orig"),
	}
	links := images.Layer{
		images.Dir("data", 0o755),
		images.Hardlink("data/keep2", "data/keep"),
		images.Hardlink("data/link2", "data/link"),
	}
	return images.Spec{Repo: "test/hardlink-deleted", Tag: "1", Layers: []images.Layer{base, deletes, links},
		Cmd: []string{images.ProbePath, "cat", "/data/link"}}
}

// ParentLater is an image whose upper layer's tar lists files before their
// parent directories (which exist in no lower layer, or with other metadata).
func ParentLater(probe []byte) images.Spec {
	base := images.Layer{
		images.Dir("bin", 0o755),
		{Path: "bin/probe", Type: tar.TypeReg, Mode: 0o755, Body: probe},
		images.Dir("data", 0o755),
		images.Dir("data/exists", 0o755),
	}
	later := images.Layer{
		images.File("data/late/sub/file", 0o644, "before its parents\n"),
		{Path: "data/late/sub", Type: tar.TypeDir, Mode: 0o700, UID: 1000, GID: 1000},
		images.Dir("data/late", 0o711),
		images.File("data/exists/deeper/f", 0o600, "in a directory listed after\n"),
		{Path: "data/exists/deeper", Type: tar.TypeDir, Mode: 0o750, UID: 7, GID: 8},
		{Path: "data/exists", Type: tar.TypeDir, Mode: 0o751, UID: 3, GID: 4},
		images.File("data/implied/only/f", 0o644, "parents never listed\n"),
	}
	return images.Spec{Repo: "test/parent-later", Tag: "1", Layers: []images.Layer{base, later},
		Cmd: []string{images.ProbePath, "cat", "/data/late/sub/file"}}
}

var (
	fastOnce  sync.Once
	fastSpecs []images.Spec
	fastErr   error
)

// fastPathImages pushes this file's images next to the fixture's and returns
// every image TestSameTreeAsNativeFastPath compares, with the directory
// holding its content.
func fastPathImages(t *testing.T, f *fixture) ([]images.Spec, map[string]string) {
	t.Helper()
	fastOnce.Do(func() {
		for _, spec := range []images.Spec{HardlinkDeleted(f.probe), ParentLater(f.probe)} {
			ref, err := images.Push(f.registry.Addr, spec)
			if err != nil {
				fastErr = err
				return
			}
			f.refs[spec.Repo] = ref
			fastSpecs = append(fastSpecs, spec)
		}
	})
	if fastErr != nil {
		t.Fatalf("push fast path images: %v", fastErr)
	}
	specs := append([]images.Spec{f.features, f.many}, fastSpecs...)
	dirs := map[string]string{f.many.Repo: "/many"}
	return specs, dirs
}

// withUnpacks sets the transfer service's max_concurrent_unpacks (above 1:
// parallel unpack) and debug logging, where the differ reports each layer.
func withUnpacks(n int) envOption {
	return func(o *harness.Options) {
		prev := o.Edit
		o.Edit = func(cfg map[string]any) {
			if prev != nil {
				prev(cfg)
			}
			harness.Set(cfg, n, "plugins", "io.containerd.transfer.v1.local", "max_concurrent_unpacks")
			harness.Set(cfg, "debug", "debug", "level")
		}
	}
}

// TestSameTreeAsNativeFastPath pulls every test image through the transfer
// service into fuse-overlayfs with the README configuration (our differ),
// sequentially and in parallel, and compares the tree a container sees with
// the native snapshotter's. The containerd log must show that the layers
// were written directly (and, in parallel, before their parents were
// known), and no layer directory may hold a marker only writing through
// FUSE leaves.
func TestSameTreeAsNativeFastPath(t *testing.T) {
	for _, tc := range []struct {
		name    string
		unpacks int
	}{{"sequential", 1}, {"parallel", 4}} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, withUnpacks(tc.unpacks))
			specs, dirs := fastPathImages(t, e.fx)
			layers := 0
			for _, spec := range specs {
				ref := e.fx.refs[spec.Repo]
				e.ctr("images", "pull", "--plain-http", "--snapshotter", sn, "--platform", "linux/"+goarch(), ref)
				e.ctr("images", "pull", "--plain-http", "--snapshotter", "native", "--platform", "linux/"+goarch(), ref)
				layers += len(spec.Layers)
			}
			// Before any container runs: containers write through FUSE.
			e.checkDirectLog(e.c.LogPath, e.builtinRoot(), tc.unpacks > 1, layers)
			e.checkNoFUSEMarkers(e.builtinRoot())
			for i, spec := range specs {
				ref := e.fx.refs[spec.Repo]
				dir := dirs[spec.Repo]
				if dir == "" {
					dir = "/data"
				}
				e.sameTree(ref, dir, fmt.Sprintf("fp%d", i))
				if spec.Repo == e.fx.features.Repo {
					e.checkHiddenByPath(ref, "fp-open", "/data/deleted", "/data/d1/old", "/data/d2/old", "/data/d2/sub/oldsub", "/data/gone-tree/sub/f")
				}
				if spec.Repo == "test/hardlink-deleted" {
					e.checkHiddenByPath(ref, "fp-open", "/data/orig")
				}
			}
		})
	}
}

// sameTree compares dir as containers on fuse-overlayfs and native see it.
func (e *env) sameTree(ref, dir, prefix string) {
	t := e.t
	t.Helper()
	trees := map[string]string{}
	for _, s := range []string{sn, "native"} {
		trees[s] = e.run("--rm", "--snapshotter", s, ref, prefix+"-tree-"+s, images.ProbePath, "treedump", dir)
	}
	if trees[sn] != trees["native"] {
		t.Fatalf("%s of %s differs between fuse-overlayfs and native:\n%s", dir, ref, lineDiff(trees["native"], trees[sn]))
	}
	if strings.Count(trees[sn], "\n") < 3 {
		t.Fatalf("%s of %s is nearly empty:\n%s", dir, ref, trees[sn])
	}
}

// checkHiddenByPath opens files that a layer deleted, by their path (not
// through a listing), in containers on fuse-overlayfs: each must fail with
// ENOENT.
func (e *env) checkHiddenByPath(ref, id string, paths ...string) {
	t := e.t
	t.Helper()
	for _, p := range paths {
		out, err := e.c.Ctr(e.ctx, "run", "--rm", "--snapshotter", sn, ref, id, images.ProbePath, "cat", p)
		// A failed `ctr run --rm` may leave its container behind.
		_, _ = e.c.Ctr(e.ctx, "containers", "rm", id)
		if err == nil {
			t.Errorf("a container opened %s, which a layer deleted: %q", p, out)
		} else if !strings.Contains(err.Error(), "no such file or directory") {
			t.Errorf("opening %s failed, but not with ENOENT: %v", p, err)
		}
	}
}

// builtinRoot is the root of the plugin built into our containerd.
func (e *env) builtinRoot() string {
	return filepath.Join(e.c.Root, "io.containerd.snapshotter.v1.fuse-overlayfs")
}

// checkDirectLog reads the debug log (containerd's, or the gRPC server's)
// of the process the differ runs in: the differ logs every layer it writes
// directly into a snapshot below root, with detached=true when the snapshot
// had no parent yet.
func (e *env) checkDirectLog(logPath, root string, parallel bool, layers int) {
	t := e.t
	t.Helper()
	data, err := os.ReadFile(logPath)
	if err != nil {
		t.Fatal(err)
	}
	var direct, detached int
	for _, line := range strings.Split(string(data), "\n") {
		// The differ's own line: it has the detached field.
		if strings.Contains(line, "layer applied directly") && strings.Contains(line, "detached=") && strings.Contains(line, "dir="+root+"/") {
			direct++
			if strings.Contains(line, "detached=true") {
				detached++
			}
		}
	}
	// Empty layers shared by digest are applied once; every image has
	// more non-empty layers than that leaves out.
	if direct < layers/2 {
		t.Errorf("the differ wrote %d layers directly, want most of %d", direct, layers)
	}
	nonBase := direct - detached
	if parallel && nonBase != 0 {
		t.Errorf("parallel unpack: %d layers were applied on a parent-bearing mount, want all detached", nonBase)
	}
	if !parallel && nonBase == 0 {
		t.Errorf("sequential unpack: no layer was applied onto its parents")
	}
}

// checkNoFUSEMarkers: writing through fuse-overlayfs leaves .wh..wh..opq
// files in directories it creates; the direct path never does. root is the
// snapshotter's root.
func (e *env) checkNoFUSEMarkers(root string) {
	t := e.t
	t.Helper()
	err := filepath.WalkDir(filepath.Join(root, "snapshots"), func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Name() == ".wh..wh..opq" || d.Name() == ".wh..opq" {
			t.Errorf("FUSE-made marker in a layer: %s", p)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
