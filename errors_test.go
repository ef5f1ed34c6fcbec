//go:build linux

package fuseoverlayfs

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// TestIDMappingErrorKeepsCause: a malformed ID-mapping label is refused with
// an error naming the label, of class invalid argument, that keeps strconv's
// error (syntax or range) as its cause.
func TestIDMappingErrorKeepsCause(t *testing.T) {
	for value, cause := range map[string]error{
		"0:x:1":          strconv.ErrSyntax,
		"+1:0:1":         strconv.ErrSyntax,
		"0::1":           strconv.ErrSyntax,
		"4294967296:0:1": strconv.ErrRange,
	} {
		_, err := idMapOptions(map[string]string{snapshots.LabelSnapshotUIDMapping: value})
		if !errdefs.IsInvalidArgument(err) {
			t.Errorf("%q: error %v is not invalid argument", value, err)
		}
		var num *strconv.NumError
		if !errors.Is(err, cause) || !errors.As(err, &num) {
			t.Errorf("%q: error %v does not keep strconv's %v", value, err, cause)
		}
		if err != nil && !strings.Contains(err.Error(), snapshots.LabelSnapshotUIDMapping) {
			t.Errorf("%q: error %v does not name the label", value, err)
		}
	}
}

// TestNewSnapshotterErrorKeepsCause: a root that cannot be created keeps the
// file system's error.
func TestNewSnapshotterErrorKeepsCause(t *testing.T) {
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := NewSnapshotter(filepath.Join(file, "root"))
	if !errors.Is(err, unix.ENOTDIR) {
		t.Errorf("error %v does not wrap ENOTDIR", err)
	}
}
