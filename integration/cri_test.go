package integration

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fosnap/fuseoverlayfs/integration/internal/harness"
	"github.com/fosnap/fuseoverlayfs/integration/internal/images"
)

// TestCRIPod drives containerd's CRI plugin with crictl as a kubelet would:
// the image service's snapshotter is fuse-overlayfs (README config) and the
// sandbox image is pinned to one this test pushed to the local registry.
func TestCRIPod(t *testing.T) {
	var pauseRef string
	e := newEnv(t, func(o *harness.Options) {
		pauseRef = getFixture(t).refs[images.Pause(nil).Repo]
		o.Edit = func(cfg map[string]any) {
			harness.Set(cfg, pauseRef, "plugins", "io.containerd.cri.v1.images", "pinned_images", "sandbox")
		}
	})
	ref := e.fx.refs[e.fx.features.Repo]

	e.crictl("pull", ref)
	assertContains(t, "crictl images", e.crictl("images"), strings.Split(ref, ":1")[0])

	logDir := filepath.Join(e.dir, "pods")
	if err := os.MkdirAll(logDir, 0o700); err != nil {
		t.Fatal(err)
	}
	podCfg := writeJSON(t, e.dir, "pod.json", map[string]any{
		"metadata":      map[string]any{"name": "fo-pod", "namespace": "fo-test", "uid": "fo-pod-uid", "attempt": 0},
		"log_directory": logDir,
		"linux": map[string]any{"security_context": map[string]any{
			"namespace_options": map[string]any{"network": 2}, // NODE: host network
		}},
	})
	ctrCfg := writeJSON(t, e.dir, "container.json", map[string]any{
		"metadata": map[string]any{"name": "probe"},
		"image":    map[string]any{"image": ref},
		"command":  []string{images.ProbePath, "show", "/layer1.txt", "/layer6.txt"},
		"log_path": "probe.log",
	})

	pod := strings.TrimSpace(e.crictl("runp", podCfg))
	// The sandbox came from the pinned image, pulled by CRI from our registry.
	assertContains(t, "crictl images after runp", e.crictl("images"), strings.Split(pauseRef, ":1")[0])
	e.waitFuseMount(pod)

	ctr := strings.TrimSpace(e.crictl("create", pod, ctrCfg, podCfg))
	e.crictl("start", ctr)
	e.waitFuseMount(ctr)
	e.assertChain("k8s.io", sn, ctr, len(e.fx.features.Layers))

	err := harness.Poll(30*time.Second, 200*time.Millisecond, func() error {
		out, err := e.c.Crictl(e.ctx, "logs", ctr)
		if err != nil {
			return err
		}
		if !strings.Contains(out, "from layer 1\nfrom layer 6\nready") {
			return fmt.Errorf("logs so far: %q", out)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	out := e.crictl("exec", ctr, images.ProbePath, "cat", "/layer3.txt", "/data/d2/new")
	if out != "from layer 3\nnew d2\n" {
		t.Fatalf("crictl exec: got %q", out)
	}
	e.crictl("exec", "--sync", ctr, images.ProbePath, "write", "/tmp-from-exec", "exec wrote this")
	assertFile(t, e.upperdir("k8s.io", ctr), "tmp-from-exec", "exec wrote this")

	e.crictl("stop", ctr)
	e.crictl("rm", ctr)
	e.crictl("stopp", pod)
	e.crictl("rmp", pod)
	if out := strings.TrimSpace(e.crictl("pods", "-q")); out != "" {
		t.Fatalf("pods left after rmp: %q", out)
	}
	if out := strings.TrimSpace(e.crictl("ps", "-a", "-q")); out != "" {
		t.Fatalf("containers left after rm: %q", out)
	}
	e.crictl("rmi", ref)
	if out := e.crictl("images", "-q"); strings.Contains(out, e.fx.features.Repo) {
		t.Fatalf("image still listed after rmi: %s", out)
	}
	if len(e.fuseMounts()) != 0 {
		t.Fatalf("FUSE mounts left after the pod was removed: %v", e.fuseMounts())
	}
}

func writeJSON(t *testing.T, dir, name string, v any) string {
	t.Helper()
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}
