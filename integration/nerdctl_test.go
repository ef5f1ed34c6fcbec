package integration

import (
	"testing"

	"github.com/fosnap/fuseoverlayfs/integration/internal/images"
)

// TestNerdctlRun runs containers with nerdctl on fuse-overlayfs, with no
// network and with the host's network (neither needs CNI plugins).
func TestNerdctlRun(t *testing.T) {
	e := newEnv(t)
	ref := e.fx.refs[e.fx.features.Repo]
	const ns = "nerdctl-test"
	global := []string{"--snapshotter", sn, "--insecure-registry"}

	e.nerdctl(ns, append(global, "pull", "--quiet", ref)...)
	for _, net := range []string{"none", "host"} {
		out := e.nerdctl(ns, append(global, "run", "--rm", "--net", net, ref)...)
		if out != featuresOutput {
			t.Fatalf("nerdctl run --net %s: got %q, want %q", net, out, featuresOutput)
		}
	}

	// A named container keeps its snapshot: check the chain and the write.
	e.nerdctl(ns, append(global, "run", "--net", "none", "--name", "nerdctl-write", ref,
		images.ProbePath, "write", "/from-nerdctl", "written through nerdctl")...)
	id := e.nerdctl(ns, "inspect", "--format", "{{.ID}}", "nerdctl-write")
	id = trimSpace(id)
	e.assertChain(ns, sn, id, len(e.fx.features.Layers))
	assertFile(t, e.upperdir(ns, id), "from-nerdctl", "written through nerdctl")
	e.nerdctl(ns, "rm", "nerdctl-write")
	e.nerdctl(ns, append(global, "rmi", ref)...)
}
