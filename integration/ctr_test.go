package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fosnap/fuseoverlayfs/integration/internal/harness"
	"github.com/fosnap/fuseoverlayfs/integration/internal/images"
)

// TestCtrPullRun pulls through the transfer service and client-side
// (--local), runs containers on fuse-overlayfs, and checks that a container's
// write lands in its active snapshot and that the snapshot chain is the
// image's layers.
func TestCtrPullRun(t *testing.T) {
	e := newEnv(t)
	ref := e.fx.refs[e.fx.features.Repo]
	layers := len(e.fx.features.Layers)

	// Transfer service: unpacks to fuse-overlayfs through unpack_config.
	e.ctr("images", "pull", "--plain-http", "--snapshotter", sn, "--platform", "linux/"+goarch(), ref)
	out := e.ctr("run", "--rm", "--snapshotter", sn, ref, "pull-cat")
	if out != featuresOutput {
		t.Fatalf("container output: got %q, want %q", out, featuresOutput)
	}

	// The container writes; the write is in the active snapshot's upper
	// directory on the host.
	e.ctr("run", "--snapshotter", sn, ref, "pull-write", images.ProbePath, "write", "/written-by-container", "hello from the container")
	e.assertChain("default", sn, "pull-write", layers)
	upper := e.upperdir("default", "pull-write")
	got, err := os.ReadFile(filepath.Join(upper, "written-by-container"))
	if err != nil || string(got) != "hello from the container" {
		t.Fatalf("the container's write in %s: %q, %v", upper, got, err)
	}
	tree := e.ctr("snapshots", "--snapshotter", sn, "tree")
	assertContains(t, "ctr snapshots tree", tree, "pull-write")
	e.ctr("containers", "rm", "pull-write")
	if _, ok := e.snapshots("default", sn)["pull-write"]; ok {
		t.Fatal("the active snapshot outlived its container")
	}

	// While a container runs, its root is a fuse-overlayfs mount.
	e.ctr("run", "-d", "--snapshotter", sn, ref, "pull-bg", images.ProbePath, "pause")
	m := e.waitFuseMount("pull-bg")
	if !strings.HasPrefix(m.FSType, "fuse.fuse-overlayfs") && m.FSType != "fuse3.fuse-overlayfs" {
		t.Fatalf("container root mount type %q, want fuse.fuse-overlayfs", m.FSType)
	}
	e.stopTask("default", "pull-bg")
	e.ctr("containers", "rm", "pull-bg")

	// Client-side pull and unpack into another namespace.
	e.ctr("-n", "local", "images", "pull", "--local", "--plain-http", "--snapshotter", sn, ref)
	out = e.ctr("-n", "local", "run", "--rm", "--snapshotter", sn, ref, "local-cat")
	if out != featuresOutput {
		t.Fatalf("container output (--local pull): got %q, want %q", out, featuresOutput)
	}
	e.ctr("-n", "local", "containers", "create", "--snapshotter", sn, ref, "local-c")
	e.assertChain("local", sn, "local-c", layers)
	e.ctr("-n", "local", "containers", "rm", "local-c")
	e.ctr("-n", "local", "images", "rm", "--sync", ref)
	e.ctr("images", "rm", "--sync", ref)
}

// stopTask sends SIGTERM to a task, waits for it to stop and deletes it.
func (e *env) stopTask(ns, id string) {
	e.t.Helper()
	e.ctr("-n", ns, "tasks", "kill", id)
	err := harness.Poll(30*time.Second, 100*time.Millisecond, func() error {
		_, err := e.c.Ctr(e.ctx, "-n", ns, "tasks", "delete", id)
		return err
	})
	if err != nil {
		e.t.Fatal(err)
	}
}

// TestCtrImportRun imports an OCI archive through the transfer service into
// fuse-overlayfs and runs it.
func TestCtrImportRun(t *testing.T) {
	e := newEnv(t)
	archive := filepath.Join(e.dir, "features.tar")
	ref := "import.test/fosnap/features:1"
	if err := images.WriteOCIArchive(archive, ref, e.fx.features); err != nil {
		t.Fatal(err)
	}
	out := e.ctr("images", "import", "--snapshotter", sn, archive)
	assertContains(t, "ctr images import", out, ref)
	e.ctr("containers", "create", "--snapshotter", sn, ref, "import-c")
	e.assertChain("default", sn, "import-c", len(e.fx.features.Layers))
	e.ctr("containers", "rm", "import-c")
	out = e.ctr("run", "--rm", "--snapshotter", sn, ref, "import-run")
	if out != featuresOutput {
		t.Fatalf("container output: got %q, want %q", out, featuresOutput)
	}
	e.ctr("images", "rm", "--sync", ref)
}
