//go:build linux

package hostcheck

import (
	"errors"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// TestCheckNestedRoots runs the host check with the root on a kernel overlay
// mount (containerd inside a container), which it accepts, and on a
// fuse-overlayfs mount, where no whiteout form stays visible: it refuses that
// root, naming it and what is hidden.
func TestCheckNestedRoots(t *testing.T) {
	testutil.RequireFUSE(t)
	if err := requireErr(testutil.KernelOverlay(t)); err != nil {
		t.Fatalf("root on a kernel overlay: %v", err)
	}
	root := testutil.FuseOverlay(t)
	err := requireErr(root)
	if !errors.Is(err, ErrUnsupported) || !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("root on a fuse-overlayfs mount: %v, want ErrUnsupported of class failed precondition", err)
	}
	for _, want := range []string{root, "whiteouts", "opaque markers", "do not stay visible"} {
		if !strings.Contains(err.Error(), want) {
			t.Fatalf("error %q does not name %q", err, want)
		}
	}
}
