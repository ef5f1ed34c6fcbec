package integration

import (
	"os"
	"path/filepath"
	"testing"

	fuseoverlayfs "github.com/fosnap/fuseoverlayfs"
	"github.com/fosnap/fuseoverlayfs/integration/internal/harness"
	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// TestRootHeldByAnotherProcess starts our containerd on a snapshotter root
// that this test process holds open through the library, as a second
// containerd or a proxy server would: containerd must come up (the plugin's
// load gives up on the metadata store's lock instead of hanging the daemon's
// start), `ctr plugins ls` must list the plugin as skipped and `-d` say that
// the root is in use by another process, and the rest of containerd must
// work (a container on native). Once the holder closes, a restart loads the
// plugin.
func TestRootHeldByAnotherProcess(t *testing.T) {
	requirePrereqs(t)
	held, err := os.MkdirTemp("", "fo-held-")
	if err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(held, "root")
	holder, err := fuseoverlayfs.NewSnapshotter(root)
	if err != nil {
		t.Fatal(err)
	}
	open := true
	closeHolder := func() {
		if open {
			open = false
			if err := holder.Close(); err != nil {
				t.Error(err)
			}
		}
	}
	// Registered before newEnv's, so it runs after containerd has stopped.
	t.Cleanup(func() {
		closeHolder()
		testutil.RequireNoLeftovers(t, held)
		if err := os.RemoveAll(held); err != nil {
			t.Error(err)
		}
	})

	// newEnv fails the test unless containerd answers within its wait.
	e := newEnv(t, func(o *harness.Options) {
		o.Edit = func(cfg map[string]any) {
			harness.Set(cfg, root, "plugins", "io.containerd.snapshotter.v1."+sn, "root_path")
		}
	})
	assertPluginStatus(t, e.ctr("plugins", "ls"), "skip")
	detail := e.ctr("plugins", "ls", "-d", "type==io.containerd.snapshotter.v1,id=="+sn)
	assertContains(t, "ctr plugins ls -d", detail, "Unavailable", "skip plugin: fuse-overlayfs snapshotter: ", "snapshotter root "+root+" is in use by another process")
	t.Logf("reason as shown by ctr plugins ls -d:\n%s", detail)
	// The rest of containerd works: a failed (not skipped) snapshotter
	// would have taken the metadata plugin, and every service, with it.
	ref := e.fx.refs[e.fx.features.Repo]
	e.ctr("images", "pull", "--plain-http", "--snapshotter", "native", ref)
	if out := e.ctr("run", "--rm", "--snapshotter", "native", ref, "held-native"); out != featuresOutput {
		t.Fatalf("container on native: got %q", out)
	}
	e.ctr("images", "rm", "--sync", ref)

	closeHolder()
	if err := e.c.Restart(e.ctx); err != nil {
		t.Fatal(err)
	}
	assertPluginStatus(t, e.ctr("plugins", "ls"), "ok")
}
