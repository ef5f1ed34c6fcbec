package integration

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
)

// TestProxyWrongContentDir: the server reading layers from a directory
// that is not containerd's content store (containerd with another root,
// the server left on its default) fails every unpack, and what `ctr
// images pull` prints names the missing layer's digest, the directory the
// server looked in and --content-dir. The server does not fall back to the
// walking differ: it has no client of containerd's content store, and a
// fallback would hide the mistake behind pulls through FUSE. Restarted
// with the right directory, the same pull works.
func TestProxyWrongContentDir(t *testing.T) {
	e, p := newProxyEnv(t, 1)
	right := p.ContentDir
	p.stop()
	p.ContentDir = filepath.Join(t.TempDir(), "not-containerds")
	p.restart()
	if !strings.Contains(p.log(), "containerd's content store directory cannot be read now") {
		t.Errorf("no warning at start about the missing content directory %s", p.ContentDir)
	}
	ref := e.fx.refs[e.fx.features.Repo]
	pull := []string{"images", "pull", "--plain-http", "--snapshotter", sn, "--platform", "linux/" + goarch(), ref}
	out, err := e.c.Ctr(e.ctx, pull...)
	if err == nil {
		t.Fatalf("pull with the server reading %s succeeded:\n%s", p.ContentDir, out)
	}
	seen := err.Error() + "\n" + out
	t.Logf("what ctr prints:\n%s", seen)
	for _, want := range []string{"not in containerd's content store", "the directory " + p.ContentDir + " does not exist", "content_dir " + p.ContentDir, "--content-dir", "io.containerd.content.v1.content"} {
		if !strings.Contains(seen, want) {
			t.Errorf("ctr's error does not contain %q", want)
		}
	}
	m := regexp.MustCompile(`read layer (sha256:[0-9a-f]{64})`).FindStringSubmatch(seen)
	if m == nil {
		t.Fatal("ctr's error names no layer digest")
	}
	// The digest named is a layer containerd did fetch.
	d := digest.Digest(m[1])
	if _, err := os.Stat(filepath.Join(right, "blobs", d.Algorithm().String(), d.Encoded())); err != nil {
		t.Errorf("the digest named, %s, is not in containerd's store: %v", d, err)
	}

	p.stop()
	p.ContentDir = right
	p.restart()
	e.ctr(pull...)
	if p.appliedDirectly() == 0 {
		t.Error("after the fix the server applied no layer directly")
	}
	e.ctr("images", "rm", "--sync", ref)
	e.waitNoSnapshots(p.Root)
}
