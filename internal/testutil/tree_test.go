package testutil

import (
	"os"
	"path/filepath"
	"testing"
)

// TestTreeSum: the sum changes with a file's content, its mode and a
// symlink's target, and is the same for the same tree.
func TestTreeSum(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "f"), []byte("a"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("f", filepath.Join(dir, "l")); err != nil {
		t.Fatal(err)
	}
	sum := func() string {
		t.Helper()
		s, err := TreeSum(dir)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	base := sum()
	if again := sum(); again != base {
		t.Fatalf("same tree, sums %s and %s", base, again)
	}
	for name, change := range map[string]func() error{
		"content": func() error { return os.WriteFile(filepath.Join(dir, "f"), []byte("b"), 0o644) },
		"mode":    func() error { return os.Chmod(filepath.Join(dir, "f"), 0o600) },
		"symlink": func() error {
			_ = os.Remove(filepath.Join(dir, "l"))
			return os.Symlink("g", filepath.Join(dir, "l"))
		},
	} {
		before := sum()
		if err := change(); err != nil {
			t.Fatal(err)
		}
		if sum() == before {
			t.Errorf("a change of %s left the sum unchanged", name)
		}
	}
}
