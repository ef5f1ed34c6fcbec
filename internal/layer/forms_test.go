package layer

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"
	"golang.org/x/sys/unix"
)

// TestProbeFormsNestedHosts probes a plain directory, a kernel overlay mount
// (containerd inside a container) and a fuse-overlayfs mount, and checks
// that every form the probe chooses is still there when written again and
// looked for, and that it says so when no form survives.
func TestProbeFormsNestedHosts(t *testing.T) {
	testutil.RequireFUSE(t)
	t.Run("plain", func(t *testing.T) {
		f := probeForms(t.TempDir())
		if !f.DeviceWhiteouts || f.OpaqueXattr != OpaqueXattrTrusted || f.Invisible != "" {
			t.Fatalf("as root on %s: %+v, want device whiteouts and %s", os.TempDir(), f, OpaqueXattrTrusted)
		}
	})
	t.Run("kernel-overlay", func(t *testing.T) {
		dir := testutil.KernelOverlay(t)
		f := probeForms(dir)
		if f.DeviceWhiteouts {
			t.Fatalf("kernel overlay: probe chose device whiteouts, which overlayfs refuses: %+v", f)
		}
		if f.Invisible != "" {
			t.Fatalf("kernel overlay: probe found no visible form of %s", f.Invisible)
		}
		assertFormsVisible(t, dir, f)
	})
	t.Run("fuse-overlayfs", func(t *testing.T) {
		f := probeForms(testutil.FuseOverlay(t))
		if !strings.Contains(f.Invisible, "whiteouts") || !strings.Contains(f.Invisible, "opaque") {
			t.Fatalf("fuse-overlayfs mount: Invisible = %q, want whiteouts and opaque markers named (%+v)", f.Invisible, f)
		}
	})
}

// assertFormsVisible writes the whiteout and opaque forms f names in a new
// directory of dir and looks for them.
func assertFormsVisible(t *testing.T, dir string, f Forms) {
	t.Helper()
	d := filepath.Join(dir, "look")
	if err := os.Mkdir(d, 0o755); err != nil {
		t.Fatal(err)
	}
	wh := filepath.Join(d, whPrefix+"gone")
	if f.DeviceWhiteouts {
		wh = filepath.Join(d, "gone")
		if err := unix.Mknod(wh, unix.S_IFCHR, 0); err != nil {
			t.Fatalf("mknod chosen whiteout: %v", err)
		}
	} else if err := os.WriteFile(wh, nil, 0o600); err != nil {
		t.Fatalf("create chosen whiteout: %v", err)
	}
	if names := readNames(t, d); len(names) != 1 || names[0] != filepath.Base(wh) {
		t.Fatalf("listing after writing whiteout %s: %v", wh, names)
	}
	if err := unix.Lsetxattr(d, f.OpaqueXattr, []byte("y"), 0); err != nil {
		t.Fatalf("set chosen opaque xattr %s: %v", f.OpaqueXattr, err)
	}
	buf := make([]byte, 4)
	if n, err := unix.Lgetxattr(d, f.OpaqueXattr, buf); err != nil || string(buf[:n]) != "y" {
		t.Fatalf("read back %s: %q, %v", f.OpaqueXattr, buf[:max(n, 0)], err)
	}
}

func readNames(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}
