package integration

import (
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

func goarch() string { return runtime.GOARCH }

func trimSpace(s string) string { return strings.TrimSpace(s) }

// assertFile fails unless dir/name holds exactly want.
func assertFile(t *testing.T, dir, name, want string) {
	t.Helper()
	got, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil || string(got) != want {
		t.Fatalf("%s in %s: got %q (%v), want %q", name, dir, got, err, want)
	}
}
