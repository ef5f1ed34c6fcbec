package integration

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/fosnap/fuseoverlayfs/integration/internal/harness"
	"github.com/fosnap/fuseoverlayfs/integration/internal/images"
)

// TestRestart stops containerd and starts it again on the same root: images,
// committed snapshots and a stopped container's active snapshot survive, the
// old container starts again and a new one runs.
func TestRestart(t *testing.T) {
	e := newEnv(t)
	ref := e.fx.refs[e.fx.features.Repo]
	e.ctr("images", "pull", "--plain-http", "--snapshotter", sn, ref)
	e.ctr("run", "--snapshotter", sn, ref, "restart-keep", images.ProbePath, "write", "/kept", "written before the restart")
	imagesBefore := e.ctr("images", "ls", "-q")
	snapsBefore := e.snapshots("default", sn)
	upper := e.upperdir("default", "restart-keep")

	oldPID := e.c.PID()
	if err := e.c.Restart(e.ctx); err != nil {
		t.Fatal(err)
	}
	if e.c.PID() == oldPID {
		t.Fatalf("containerd pid unchanged (%d) after restart", oldPID)
	}
	assertPluginStatus(t, e.ctr("plugins", "ls"), "ok")
	if got := e.ctr("images", "ls", "-q"); got != imagesBefore {
		t.Fatalf("images after restart: %q, before: %q", got, imagesBefore)
	}
	if got := e.snapshots("default", sn); !reflect.DeepEqual(got, snapsBefore) {
		t.Fatalf("snapshots after restart:\n%v\nbefore:\n%v", got, snapsBefore)
	}
	if got := e.upperdir("default", "restart-keep"); got != upper {
		t.Fatalf("upperdir after restart %q, before %q", got, upper)
	}
	assertFile(t, upper, "kept", "written before the restart")

	// The stopped container runs again on its surviving snapshot.
	if err := os.Remove(filepath.Join(upper, "kept")); err != nil {
		t.Fatal(err)
	}
	// Attached, `ctr tasks start` waits for the exit and deletes the task.
	e.ctr("tasks", "start", "restart-keep")
	assertFile(t, upper, "kept", "written before the restart")
	e.ctr("containers", "rm", "restart-keep")

	out := e.ctr("run", "--rm", "--snapshotter", sn, ref, "restart-new")
	if out != featuresOutput {
		t.Fatalf("new container after restart: got %q, want %q", out, featuresOutput)
	}
	e.ctr("images", "rm", "--sync", ref)
}

// TestPluginSkipped starts containerd with a PATH that lacks fuse-overlayfs:
// containerd runs, the plugin is listed as skipped with the reason, and the
// other snapshotters still work.
func TestPluginSkipped(t *testing.T) {
	requirePrereqs(t)
	pathDir, err := os.MkdirTemp("", "fo-path-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(pathDir) })
	// Everything containerd needs except fuse-overlayfs.
	for _, tool := range []string{"runc", "mount.fuse3", "fusermount3", "mount", "umount"} {
		p, err := harness.LookPath(tool)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(p, filepath.Join(pathDir, tool)); err != nil {
			t.Fatal(err)
		}
	}
	bin, err := harness.BinDir()
	if err != nil {
		t.Fatal(err)
	}
	e := newEnv(t, func(o *harness.Options) { o.Path = bin + ":" + pathDir })

	assertPluginStatus(t, e.ctr("plugins", "ls"), "skip")
	detail := e.ctr("plugins", "ls", "-d", "type==io.containerd.snapshotter.v1,id==fuse-overlayfs")
	assertContains(t, "ctr plugins ls -d", detail, "fuse-overlayfs snapshotter", "install", "fuse-overlayfs")
	if !strings.Contains(detail, "skip") {
		t.Fatalf("ctr plugins ls -d does not say the plugin was skipped:\n%s", detail)
	}
	t.Logf("skip reason as shown by ctr plugins ls -d:\n%s", detail)

	// containerd keeps working: pull and run on native through the transfer
	// service (whose fuse-overlayfs unpack entry is optional).
	ref := e.fx.refs[e.fx.features.Repo]
	e.ctr("images", "pull", "--plain-http", "--snapshotter", "native", ref)
	if out := e.ctr("run", "--rm", "--snapshotter", "native", ref, "skipped-native"); out != featuresOutput {
		t.Fatalf("container on native: got %q", out)
	}
	if _, err := e.c.Ctr(e.ctx, "images", "pull", "--plain-http", "--snapshotter", sn, ref); err == nil {
		t.Fatal("pull with the skipped snapshotter succeeded")
	}
	e.ctr("images", "rm", "--sync", ref)
}

// assertPluginStatus checks the fuse-overlayfs line of `ctr plugins ls`.
func assertPluginStatus(t *testing.T, list, status string) {
	t.Helper()
	for _, line := range strings.Split(list, "\n") {
		f := strings.Fields(line)
		if len(f) >= 3 && f[0] == "io.containerd.snapshotter.v1" && f[1] == sn {
			if f[len(f)-1] != status {
				t.Fatalf("plugin %s status %q, want %q: %s", sn, f[len(f)-1], status, line)
			}
			return
		}
	}
	t.Fatalf("plugin %s not listed by ctr plugins ls:\n%s", sn, list)
}
