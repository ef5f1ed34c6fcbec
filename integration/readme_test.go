package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fosnap/fuseoverlayfs/integration/internal/harness"
)

// TestReadmeShowsConfig keeps the README's containerd configuration and the
// file the tests load identical.
func TestReadmeShowsConfig(t *testing.T) {
	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	readme, err := os.ReadFile(filepath.Join(root, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := os.ReadFile(filepath.Join(root, "config", "containerd.toml"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(readme), "```toml\n"+string(cfg)+"```") {
		t.Fatal("README.md does not show config/containerd.toml verbatim in a toml block")
	}
}
