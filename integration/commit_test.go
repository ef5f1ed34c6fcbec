package integration

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"os"
	"strings"
	"testing"

	"github.com/fosnap/fuseoverlayfs/integration/internal/images"
)

// fastCompares counts the diffs containerd's log says our differ wrote from
// an upper directory (differ/compare.go), not through FUSE.
func (e *env) fastCompares() int {
	return strings.Count(e.c.LogTail(100000), "diff written from the upper directory")
}

// diffTar reads the layer blob `ctr snapshots diff` wrote to its output.
func (e *env) diffTar(blob string) map[string]*tar.Header {
	t := e.t
	t.Helper()
	dgst := "output"
	var r io.Reader = strings.NewReader(blob)
	if zr, err := gzip.NewReader(bytes.NewReader([]byte(blob))); err == nil {
		r = zr
	}
	tr := tar.NewReader(r)
	out := map[string]*tar.Header{}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("diff %s: %v", dgst, err)
		}
		out[h.Name] = h
	}
	return out
}

// TestCommit: `nerdctl commit` and `ctr snapshots diff` of containers on
// fuse-overlayfs go through our Compare, which reads the container's upper
// directory; the committed image runs and shows the container's changes.
// Also for an ID-mapped container: the diff carries the container's IDs.
func TestCommit(t *testing.T) {
	e := newEnv(t)
	ref := e.fx.refs[e.fx.features.Repo]
	const ns = "commit-test"
	global := []string{"--snapshotter", sn, "--insecure-registry"}
	e.nerdctl(ns, append(global, "pull", "--quiet", ref)...)

	before := e.fastCompares()
	e.nerdctl(ns, append(global, "run", "--net", "none", "--name", "to-commit", ref,
		images.ProbePath, "edit", "/committed", "written before commit", "/data/keep", "/data/d2")...)
	e.nerdctl(ns, "commit", "to-commit", "committed:latest")
	if e.fastCompares() == before {
		t.Fatal("nerdctl commit did not go through the fast Compare (containerd's log)")
	}
	out := e.nerdctl(ns, append(global, "run", "--rm", "--net", "none", "committed:latest", images.ProbePath, "cat", "/committed", "/layer1.txt")...)
	if out != "written before commit"+"from layer 1\n" {
		t.Fatalf("committed image shows %q", out)
	}
	tree := e.nerdctl(ns, append(global, "run", "--rm", "--net", "none", "committed:latest", images.ProbePath, "treedump", "/data")...)
	for _, gone := range []string{"keep", "d2"} {
		for _, line := range strings.Split(tree, "\n") {
			if f := strings.Fields(line); len(f) > 0 && (strings.HasSuffix(f[0], "/"+gone) || f[0] == gone) {
				t.Errorf("committed image still shows %s: %s", gone, line)
			}
		}
	}
	e.nerdctl(ns, "rm", "to-commit")
	e.nerdctl(ns, append(global, "rmi", "committed:latest")...)

	// ctr snapshots diff of an active snapshot.
	id := "diff-me"
	e.ctr("images", "pull", "--plain-http", "--snapshotter", sn, "--platform", "linux/"+goarch(), ref)
	e.run("--snapshotter", sn, ref, id, images.ProbePath, "edit", "/diffed", "diffed", "/data/lowerfile")
	before = e.fastCompares()
	dgst := e.ctr("snapshots", "--snapshotter", sn, "diff", id)
	if e.fastCompares() == before {
		t.Fatal("ctr snapshots diff did not go through the fast Compare")
	}
	ents := e.diffTar(dgst)
	if h := ents["diffed"]; h == nil || h.Size != int64(len("diffed")) {
		t.Errorf("diff lacks /diffed: %v", keys(ents))
	}
	if ents["data/.wh.lowerfile"] == nil {
		t.Errorf("diff lacks the whiteout of /data/lowerfile: %v", keys(ents))
	}
	e.ctr("containers", "rm", id)

	// An ID-mapped container: its files are stored with the container's
	// IDs, and the diff carries those (not the host's 300000+).
	mapping := "0:300000:65536"
	for _, d := range []string{e.dir, e.c.State} {
		_ = chmod711(d)
	}
	e.run("--uidmap", mapping, "--gidmap", mapping, "--remap-labels", "--snapshotter", sn, ref, "idm-diff",
		images.ProbePath, "edit", "/idmapped", "mapped", "/data/owned/file")
	before = e.fastCompares()
	dgst = e.ctr("snapshots", "--snapshotter", sn, "diff", "idm-diff")
	if e.fastCompares() == before {
		t.Fatal("ctr snapshots diff of an ID-mapped snapshot did not go through the fast Compare")
	}
	ents = e.diffTar(dgst)
	if h := ents["idmapped"]; h == nil || h.Uid != 0 || h.Gid != 0 {
		t.Errorf("ID-mapped diff: /idmapped is %v, want owned by 0:0 (the container's root)", h)
	}
	if ents["data/owned/.wh.file"] == nil {
		t.Errorf("ID-mapped diff lacks the whiteout: %v", keys(ents))
	}
	e.ctr("containers", "rm", "idm-diff")
	e.ctr("images", "rm", "--sync", ref)
}

func keys(m map[string]*tar.Header) string {
	var s []string
	for k, h := range m {
		s = append(s, fmt.Sprintf("%s(%d:%d)", k, h.Uid, h.Gid))
	}
	return strings.Join(s, " ")
}

// chmod711 lets a mapped container root walk down to its bundle.
func chmod711(dir string) error { return os.Chmod(dir, 0o711) }
