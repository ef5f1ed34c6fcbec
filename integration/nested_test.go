package integration

import (
	"strings"
	"testing"

	"github.com/fosnap/fuseoverlayfs/integration/internal/harness"
	"github.com/fosnap/fuseoverlayfs/integration/internal/images"
	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// TestNestedRoots puts the snapshotter's root on the file systems of a
// nested host. On a kernel overlay mount (containerd inside a container) the
// test images pull and run with the same tree as on native. On a
// fuse-overlayfs mount no whiteout form stays visible (a 0/0 device becomes
// the outer server's own whiteout, `.wh.` names are refused), so the plugin
// is skipped with that reason instead of storing layers that come out wrong,
// and containerd runs on.
func TestNestedRoots(t *testing.T) {
	t.Run("kernel-overlay", func(t *testing.T) {
		requirePrereqs(t)
		e := newEnv(t, withRootPath(testutil.KernelOverlay(t)))
		assertPluginStatus(t, e.ctr("plugins", "ls"), "ok")
		for _, spec := range []images.Spec{e.fx.features, e.fx.many} {
			t.Run(strings.ReplaceAll(spec.Repo, "/", "_"), func(t *testing.T) { e.assertSameTreeAsNative(t, spec) })
		}
	})
	t.Run("fuse-overlayfs", func(t *testing.T) {
		requirePrereqs(t)
		root := testutil.FuseOverlay(t)
		e := newEnv(t, withRootPath(root))
		assertPluginStatus(t, e.ctr("plugins", "ls"), "skip")
		detail := e.ctr("plugins", "ls", "-d", "type==io.containerd.snapshotter.v1,id==fuse-overlayfs")
		assertContains(t, "ctr plugins ls -d", detail, root, "whiteouts", "do not stay visible")
		ref := e.fx.refs[e.fx.features.Repo]
		e.ctr("images", "pull", "--plain-http", "--snapshotter", "native", ref)
		if out := e.ctr("run", "--rm", "--snapshotter", "native", ref, "nested-native"); out != featuresOutput {
			t.Fatalf("container on native beside the skipped plugin: got %q", out)
		}
		e.ctr("images", "rm", "--sync", ref)
	})
}

// withRootPath sets the snapshotter's root_path.
func withRootPath(root string) envOption {
	return func(o *harness.Options) {
		o.Edit = func(cfg map[string]any) {
			harness.Set(cfg, root, "plugins", "io.containerd.snapshotter.v1.fuse-overlayfs", "root_path")
		}
	}
}
