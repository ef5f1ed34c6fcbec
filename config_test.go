package fuseoverlayfs

import (
	"strings"
	"testing"

	"github.com/containerd/errdefs"
)

func TestValidateContentDir(t *testing.T) {
	for _, ok := range []string{"", "/var/lib/containerd/io.containerd.content.v1.content", "/home/u/.local/share/containerd/io.containerd.content.v1.content/"} {
		c := Config{ContentDir: ok}
		if err := c.Validate(); err != nil {
			t.Errorf("content_dir %q refused: %v", ok, err)
		}
	}
	for _, bad := range []string{"relative/content", ".", "~/.local/share/containerd/io.containerd.content.v1.content", "/a\x00b"} {
		c := Config{ContentDir: bad}
		err := c.Validate()
		if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "content_dir") {
			t.Errorf("content_dir %q: got %v, want an invalid-argument error naming content_dir", bad, err)
		}
	}
}
