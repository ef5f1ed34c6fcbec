package integration

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	srvconfig "github.com/containerd/containerd/v2/cmd/containerd/server/config"

	fuseoverlayfs "github.com/fosnap/fuseoverlayfs"
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

// codeBlocks returns the blocks of language lang in doc.
func codeBlocks(doc, lang string) []string {
	var out []string
	for {
		_, after, ok := strings.Cut(doc, "```"+lang+"\n")
		if !ok {
			return out
		}
		block, tail, ok := strings.Cut(after, "```")
		if !ok {
			return append(out, after)
		}
		out = append(out, block)
		doc = tail
	}
}

// TestReadmeConfigBlocksLoaded: every toml and ini block of README.md and
// docs/ is loaded by a test: a file of config/ shown verbatim (the tests
// load those), the README's configuration-keys block (decoded here by
// containerd's own loader into our Config, which must validate and hold the
// defaults it claims), or docs/rootless.md's nerdctl block (compared with
// what nerdctl's tool prints by TestNerdctlSetupTool), or docs/building.md's
// blocks TestBuildingDoc checks.
func TestReadmeConfigBlocksLoaded(t *testing.T) {
	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	var files []string
	entries, err := os.ReadDir(filepath.Join(root, "config"))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		data, err := os.ReadFile(filepath.Join(root, "config", e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, string(data))
	}
	docs, err := filepath.Glob(filepath.Join(root, "docs", "*.md"))
	if err != nil {
		t.Fatal(err)
	}
	docs = append(docs, filepath.Join(root, "README.md"))
	rootless, err := os.ReadFile(filepath.Join(root, rootlessDoc))
	if err != nil {
		t.Fatal(err)
	}
	nerdctlBlock := readmeBlock(t, string(rootless), nerdctlSetupHeading, "toml", 0)
	// TestBuildingDoc loads these against the shipped config and what the
	// BuildKit tests write.
	buildingBlocks := []string{
		buildingDocBlock(t, "## 1. containerd", "toml", 0),
		buildingDocBlock(t, "## 2. buildkitd", "toml", 0),
	}
	keysSeen := false
	for _, doc := range docs {
		data, err := os.ReadFile(doc)
		if err != nil {
			t.Fatal(err)
		}
		rel, _ := filepath.Rel(root, doc)
		for _, lang := range []string{"toml", "ini"} {
			for i, b := range codeBlocks(string(data), lang) {
				switch {
				case slices.Contains(files, b):
				case rel == rootlessDoc && b == nerdctlBlock:
				case rel == buildingDoc && slices.Contains(buildingBlocks, b):
				case rel == "README.md" && strings.HasPrefix(b, "[plugins.'io.containerd.snapshotter.v1.fuse-overlayfs']"):
					keysSeen = true
					wantDefaults(t, b)
				default:
					t.Errorf("%s: %s block %d is loaded by no test:\n%s", rel, lang, i+1, b)
				}
			}
		}
	}
	if !keysSeen {
		t.Error("README.md shows no configuration-keys block")
	}
}

// wantDefaults decodes block as containerd reads its config file and wants
// the plugin's defaults.
func wantDefaults(t *testing.T, block string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(path, []byte("version = 3\n"+block), 0o600); err != nil {
		t.Fatal(err)
	}
	var cfg srvconfig.Config
	if err := srvconfig.LoadConfig(context.Background(), path, &cfg); err != nil {
		t.Fatalf("containerd cannot load the README's keys block: %v", err)
	}
	out, err := cfg.Decode(context.Background(), "io.containerd.snapshotter.v1.fuse-overlayfs", &fuseoverlayfs.Config{})
	if err != nil {
		t.Fatalf("decode the README's keys block: %v", err)
	}
	c := out.(*fuseoverlayfs.Config)
	if err := c.Validate(); err != nil {
		t.Fatalf("the README's keys block does not validate: %v", err)
	}
	if c.RootPath != "" || c.SyncRemove || len(c.MountOptions) != 0 {
		t.Fatalf("the README's keys block claims the defaults but decodes to %+v", c)
	}
	for _, key := range []string{"root_path", "sync_remove", "mount_options"} {
		if !strings.Contains(block, key+" = ") {
			t.Errorf("the README's keys block lacks %s", key)
		}
	}
}
