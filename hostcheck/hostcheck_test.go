//go:build linux

package hostcheck

import (
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// requireErr is Require's error alone.
func requireErr(root string) error {
	_, err := Require(root)
	return err
}

// findingOf returns the finding named check of Run(root).
func findingOf(t *testing.T, root, check string) Finding {
	t.Helper()
	for _, f := range Run(root) {
		if f.Check == check {
			return f
		}
	}
	t.Fatalf("Run(%s) has no %s finding", root, check)
	return Finding{}
}

// wantSameFacts: Require's error and Run's finding of the failing check say
// the same thing, read from the one table: both name the check and carry
// its Found and Fix.
func wantSameFacts(t *testing.T, err error, f Finding) {
	t.Helper()
	if f.Status != StatusFail || f.Fix == "" {
		t.Fatalf("finding %+v is not a failure with a fix", f)
	}
	for _, want := range []string{f.Check + ": ", f.Found, f.Fix} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Require's error %q lacks %q of Run's finding", err, want)
		}
	}
}

// TestRequireErrorKeepsNotFound: with fuse-overlayfs missing from PATH the
// error still says what to install, callers can match the cause
// (exec.ErrNotFound), ErrUnsupported and the class, and Run's finding says
// the same.
func TestRequireErrorKeepsNotFound(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	root := t.TempDir()
	err := requireErr(root)
	if !errors.Is(err, exec.ErrNotFound) {
		t.Errorf("error %q does not wrap exec.ErrNotFound", err)
	}
	if !errors.Is(err, ErrUnsupported) || !errdefs.IsFailedPrecondition(err) {
		t.Errorf("error %q is not ErrUnsupported of class failed precondition", err)
	}
	if !strings.Contains(err.Error(), "apt-get install fuse-overlayfs") {
		t.Errorf("error %q does not say what to install", err)
	}
	wantSameFacts(t, err, findingOf(t, root, CheckFuseOverlayfs))
	if f := findingOf(t, root, CheckProbeMount); f.Status != StatusFail || !strings.Contains(f.Found, "not tried: fuse-overlayfs") {
		t.Errorf("probe-mount after a failed fuse-overlayfs check: %+v", f)
	}
}

// TestRequireErrorKeepsPermission points the device check at a FUSE device
// node on a nodev mount, which not even root may open: the error must wrap
// fs.ErrPermission and keep its class and advice.
func TestRequireErrorKeepsPermission(t *testing.T) {
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
	pointDevice(t, dev)
	r := openFuseDevice(nil)
	r.Check = CheckFuseDevice
	err := r.err()
	if !errors.Is(err, fs.ErrPermission) {
		t.Errorf("error %q does not wrap fs.ErrPermission", err)
	}
	if !errors.Is(err, ErrUnsupported) || !errdefs.IsFailedPrecondition(err) {
		t.Errorf("error %q is not ErrUnsupported of class failed precondition", err)
	}
	for _, want := range []string{"cannot open " + dev + " read-write", "mode 0", "chmod 0666"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
}

func pointDevice(t *testing.T, dev string) {
	old := fuseDevice
	fuseDevice = dev
	t.Cleanup(func() { fuseDevice = old })
}

// TestRequireMessages stages a missing mount helper and a missing device.
func TestRequireMessages(t *testing.T) {
	empty := t.TempDir()
	fake := filepath.Join(empty, "fuse-overlayfs")
	if err := os.WriteFile(fake, []byte("#!/bin/sh\necho 'fuse-overlayfs: version 9.9'\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", empty+":/bin:/usr/bin")
	if _, err := exec.LookPath("mount.fuse3"); err != nil {
		root := t.TempDir()
		err := requireErr(root)
		if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "apt-get install fuse3") {
			t.Fatalf("without mount.fuse3 on PATH: %v", err)
		}
		wantSameFacts(t, err, findingOf(t, root, CheckMountHelper))
	}
	t.Setenv("PATH", empty+":/bin:/usr/bin:/sbin:/usr/sbin")
	pointDevice(t, filepath.Join(empty, "fuse"))
	root := t.TempDir()
	info, err := Require(root)
	if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "modprobe fuse") {
		t.Fatalf("without /dev/fuse: %v", err)
	}
	if info.Version != "9.9" {
		t.Fatalf("version %q, want 9.9", info.Version)
	}
	wantSameFacts(t, err, findingOf(t, root, CheckFuseDevice))
}

// TestRequireProbe: on this host every load-time check passes, Info is
// filled in, and the probe leaves nothing in the root.
func TestRequireProbe(t *testing.T) {
	testutil.RequireFUSE(t)
	root := filepath.Join(t.TempDir(), "root")
	info, err := Require(root)
	if err != nil {
		t.Fatal(err)
	}
	if info.Version == "" || info.FuseOverlayfs == "" || info.MountHelper == "" || info.OpenFiles == 0 {
		t.Fatalf("incomplete host info %+v", info)
	}
	entries, err := os.ReadDir(root)
	if err != nil || len(entries) != 0 {
		t.Fatalf("probe left %v in the root (%v)", entries, err)
	}
	testutil.RequireNoLeftovers(t, root)
}

// TestRunOrder: Run reports the checks in the table's order, each once, and
// the probe directories go again.
func TestRunOrder(t *testing.T) {
	testutil.RequireFUSE(t)
	root := t.TempDir()
	got := Run(root)
	var names []string
	for _, f := range got {
		names = append(names, f.Check)
	}
	want := []string{CheckFuseOverlayfs, CheckMountHelper, CheckFuseDevice, CheckProbeMount, CheckWhiteoutForms, CheckOpenFiles, CheckKernelOverlayfs}
	if strings.Join(names, " ") != strings.Join(want, " ") {
		t.Fatalf("checks %v, want %v (as root)", names, want)
	}
	if w := Worst(got); w == StatusFail {
		t.Fatalf("worst status %s on a host that runs the snapshotter: %+v", w, got)
	}
	if left, _ := filepath.Glob(filepath.Join(root, ".probe-*")); len(left) > 0 {
		t.Fatalf("probe directories left: %v", left)
	}
	testutil.RequireNoLeftovers(t, root)
}

func TestWorst(t *testing.T) {
	for want, fs := range map[Status][]Finding{
		StatusOK:   {{Status: StatusOK}},
		StatusWarn: {{Status: StatusOK}, {Status: StatusWarn}},
		StatusFail: {{Status: StatusFail}, {Status: StatusWarn}, {Status: StatusOK}},
	} {
		if got := Worst(fs); got != want {
			t.Errorf("Worst(%v) = %s, want %s", fs, got, want)
		}
	}
}

func TestRootOnReadOnlyFilesystem(t *testing.T) {
	testutil.RequireFUSE(t)
	dir := testutil.ReadOnlyTmpfs(t)
	root := filepath.Join(dir, "root")
	err := requireErr(root)
	if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "cannot create the snapshotter root") {
		t.Fatalf("root on read-only filesystem: %v", err)
	}
	testutil.WhileWritable(t, dir, func() {
		if err := os.Mkdir(root, 0o700); err != nil {
			t.Fatal(err)
		}
	})
	err = requireErr(root)
	if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "cannot create a probe directory") {
		t.Fatalf("probe on read-only filesystem: %v", err)
	}
	wantSameFacts(t, err, findingOf(t, root, CheckProbeMount))
}
