package integration

import (
	"fmt"
	"strings"
	"testing"

	"github.com/fosnap/fuseoverlayfs/integration/internal/images"
)

// TestSameTreeAsNative compares, for every test image, the file tree seen
// inside a container on fuse-overlayfs with the tree on containerd's native
// snapshotter (plain copies, no overlay): path, type, mode, owner, size,
// content hash, link target and xattrs of every entry.
func TestSameTreeAsNative(t *testing.T) {
	e := newEnv(t)
	for _, spec := range []images.Spec{e.fx.features, e.fx.many} {
		t.Run(strings.ReplaceAll(spec.Repo, "/", "_"), func(t *testing.T) { e.assertSameTreeAsNative(t, spec) })
	}
}

// assertSameTreeAsNative pulls spec's image for native and for
// fuse-overlayfs, dumps the tree seen inside a container on each, and fails t
// unless they are equal and match what spec says.
func (e *env) assertSameTreeAsNative(t *testing.T, spec images.Spec) {
	t.Helper()
	ref := e.fx.refs[spec.Repo]
	trees := map[string][]string{}
	for _, snapshotter := range []string{"native", sn} {
		e.ctr("images", "pull", "--plain-http", "--snapshotter", snapshotter, ref)
		id := "tree-" + snapshotter + "-" + strings.ReplaceAll(spec.Repo, "/", "-")
		out := e.ctr("run", "--rm", "--snapshotter", snapshotter, ref, id, images.ProbePath, "treedump", "/")
		trees[snapshotter] = treeLines(out)
	}
	if diff := diffLines(trees["native"], trees[sn]); diff != "" {
		t.Fatalf("tree on fuse-overlayfs differs from native (- native, + fuse-overlayfs):\n%s", diff)
	}
	checkTree(t, spec, trees[sn])
	e.ctr("images", "rm", "--sync", ref)
}

func treeLines(out string) []string {
	var lines []string
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, `"/`) {
			lines = append(lines, l)
		}
	}
	return lines
}

// diffLines returns the lines only in a (prefixed "-") and only in b ("+").
func diffLines(a, b []string) string {
	inA, inB := map[string]bool{}, map[string]bool{}
	for _, l := range a {
		inA[l] = true
	}
	for _, l := range b {
		inB[l] = true
	}
	var out strings.Builder
	for _, l := range a {
		if !inB[l] {
			fmt.Fprintf(&out, "- %s\n", l)
		}
	}
	for _, l := range b {
		if !inA[l] {
			fmt.Fprintf(&out, "+ %s\n", l)
		}
	}
	return out.String()
}

// checkTree asserts what the image's layers must produce, so that the
// comparison with native cannot pass with both trees wrong the same way.
func checkTree(t *testing.T, spec images.Spec, lines []string) {
	t.Helper()
	entries := map[string][]string{}
	for _, l := range lines {
		f := strings.Fields(l)
		entries[strings.Trim(f[0], `"`)] = f[1:]
	}
	has := func(path string, want ...string) {
		t.Helper()
		got, ok := entries[path]
		if !ok {
			t.Errorf("%s missing from the tree", path)
			return
		}
		for i, w := range want {
			if w != "" && (i >= len(got) || got[i] != w) {
				t.Errorf("%s: field %d is %q, want %q (entry %v)", path, i, got[i], w, got)
			}
		}
	}
	hasNot := func(paths ...string) {
		t.Helper()
		for _, p := range paths {
			if _, ok := entries[p]; ok {
				t.Errorf("%s present, want it deleted", p)
			}
		}
	}
	for p := range entries {
		if strings.Contains(p, ".wh.") {
			t.Errorf("whiteout marker %s visible in the container", p)
		}
	}
	switch spec.Repo {
	case "test/features":
		has("/data/d1", "dir", "0700")
		has("/data/d1/newer", "file")
		has("/data/d2/new", "file")
		has("/data/d2/later", "file")
		hasNot("/data/deleted", "/data/d1/old", "/data/d1/new", "/data/d2/old", "/data/d2/sub", "/data/gone-tree")
		has("/data/crosslink", "file", "0644", "0", "0", "27")
		has("/data/hard/c", "file")
		has("/data/sym/abs", "symlink", "", "", "", "", "", `"/data/keep"`)
		has("/data/sym/dangling", "symlink", "", "", "", "", "", `"/nonexistent/target"`)
		has("/data/modes/setuid", "file", "4755")
		has("/data/modes/setgid", "file", "2755")
		has("/data/modes/sticky", "dir", "1777")
		has("/data/modes/setgid-dir", "dir", "2775")
		has("/data/modes/chmod-later", "file", "0644")
		has("/data/fifo", "fifo", "0640")
		has("/data/owned", "dir", "0750", "2000", "3000")
		has("/data/owned/file", "file", "0640", "4321", "8765")
		has("/data/replace-me", "dir")
		has("/data/sym-replace", "file")
		if x := entries["/data/xattr/file"]; len(x) < 8 || !strings.Contains(x[7], "user.added=") || !strings.Contains(x[7], "user.test="+fmt.Sprintf("%x", "changed")) {
			t.Errorf("xattrs of /data/xattr/file: %v", x)
		}
	case "test/many":
		has("/counter", "file", "0644", "0", "0", fmt.Sprint(len(fmt.Sprintf("%d\n", manyLayers-1))))
		has(fmt.Sprintf("/many/%03d", manyLayers-1), "file")
		hasNot("/many/005", "/many/085")
		has("/many/095", "file") // layer 100 is one of the empty ones
	}
}
