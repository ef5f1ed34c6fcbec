//go:build linux

package fuseoverlayfs

import (
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// TestCheckErrorKeepsNotFound: with fuse-overlayfs missing from PATH the
// host check's error still says what to install, and callers can match the
// cause (exec.ErrNotFound), ErrUnsupported and the class.
func TestCheckErrorKeepsNotFound(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	err := Supported(t.TempDir())
	if !errors.Is(err, exec.ErrNotFound) {
		t.Errorf("error %q does not wrap exec.ErrNotFound", err)
	}
	if !errors.Is(err, ErrUnsupported) || !errdefs.IsFailedPrecondition(err) {
		t.Errorf("error %q is not ErrUnsupported of class failed precondition", err)
	}
	if !strings.Contains(err.Error(), "apt-get install fuse-overlayfs") {
		t.Errorf("error %q does not say what to install", err)
	}
}

// TestCheckErrorKeepsPermission points the device check at a FUSE device
// node on a nodev mount, which not even root may open: the error must wrap
// fs.ErrPermission and keep its class and advice.
func TestCheckErrorKeepsPermission(t *testing.T) {
	testutil.RequireRoot(t)
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_NODEV, "size=64k"); err != nil {
		t.Fatalf("mount a nodev tmpfs: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, 0); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	dev := filepath.Join(dir, "fuse")
	if err := unix.Mknod(dev, unix.S_IFCHR|0o666, int(unix.Mkdev(10, 229))); err != nil {
		t.Fatal(err)
	}
	old := fuseDevice
	fuseDevice = dev
	t.Cleanup(func() { fuseDevice = old })

	err := checkFuseDevice()
	if !errors.Is(err, fs.ErrPermission) {
		t.Errorf("error %q does not wrap fs.ErrPermission", err)
	}
	if !errors.Is(err, ErrUnsupported) || !errdefs.IsFailedPrecondition(err) {
		t.Errorf("error %q is not ErrUnsupported of class failed precondition", err)
	}
	if want := "cannot open " + dev + " read-write"; err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("error %q lacks %q", err, want)
	}
}

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
