//go:build linux

package fuseoverlayfs

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// TestBuildsElsewhere vets the packages a library user imports (this one,
// plugin/ and hostcheck/) for other systems: a cross-platform program importing them must
// compile there, and get the "only Linux" error at run time.
func TestBuildsElsewhere(t *testing.T) {
	goCmd, err := exec.LookPath("go")
	if err != nil {
		testutil.Unavailable(t, "needs the go command: %v", err)
		return
	}
	for _, goos := range []string{"darwin", "windows", "freebsd"} {
		t.Run(goos, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, goCmd, "vet", ".", "./plugin/", "./hostcheck/")
			cmd.Env = append(os.Environ(), "GOOS="+goos, "CGO_ENABLED=0")
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("GOOS=%s go vet . ./plugin/ ./hostcheck/: %v\n%s", goos, err, out)
			}
		})
	}
}

// TestOnlyLinuxError checks the error NewSnapshotter returns on other
// systems: it names the system, says only Linux is supported, and has the
// class not implemented.
func TestOnlyLinuxError(t *testing.T) {
	err := errOnlyLinux("darwin")
	want := "fuse-overlayfs snapshotter: only Linux is supported (this is darwin)"
	if !strings.Contains(err.Error(), want) {
		t.Errorf("error %q lacks %q", err, want)
	}
	if !errdefs.IsNotImplemented(err) {
		t.Errorf("error %q is not of class not implemented", err)
	}
}
