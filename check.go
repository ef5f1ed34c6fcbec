//go:build linux

package fuseoverlayfs

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	"github.com/fosnap/fuseoverlayfs/internal/layer"
	"golang.org/x/sys/unix"
)

// fuseDevice is a variable so tests can point the device check elsewhere.
var fuseDevice = "/dev/fuse"

// Supported reports whether this host can run the snapshotter with its data
// under root: fuse-overlayfs and the mount.fuse3 helper on PATH, /dev/fuse
// usable, and a probe overlay mounted inside root. The error says what to
// install or fix. A low open-files limit is not an error; it is logged as a
// warning (see HostInfo.OpenFiles).
func Supported(root string) error {
	_, err := Check(root)
	return err
}

// Check runs the same checks as Supported and also returns what it found.
func Check(root string) (HostInfo, error) {
	var info HostInfo
	var err error
	if info.FuseOverlayfs, info.Version, err = findFuseOverlayfs(); err != nil {
		return info, err
	}
	if info.MountHelper, err = exec.LookPath("mount.fuse3"); err != nil {
		return info, unsupported(err, "the mount helper mount.fuse3 was not found on PATH (%s): install fuse3 (Debian/Ubuntu: apt-get install fuse3) and make sure its directory, usually /usr/sbin or /sbin, is on PATH", os.Getenv("PATH"))
	}
	if err := checkFuseDevice(); err != nil {
		return info, err
	}
	if info.OpenFiles, err = probeMount(root); err != nil {
		return info, err
	}
	if err := checkForms(root); err != nil {
		return info, err
	}
	warnOpenFiles(info.OpenFiles)
	return info, nil
}

// unsupported builds a host-check error: ErrUnsupported, the message, the
// class errdefs.ErrFailedPrecondition and, when there is one, the cause.
func unsupported(cause error, format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	if cause == nil {
		return fmt.Errorf("%w: %s: %w", ErrUnsupported, msg, errdefs.ErrFailedPrecondition)
	}
	return fmt.Errorf("%w: %s: %w: %w", ErrUnsupported, msg, errdefs.ErrFailedPrecondition, cause)
}

func findFuseOverlayfs() (path, version string, err error) {
	path, err = exec.LookPath("fuse-overlayfs")
	if err != nil {
		return "", "", unsupported(err, "fuse-overlayfs was not found on PATH (%s): install it (Debian/Ubuntu: apt-get install fuse-overlayfs; Fedora: dnf install fuse-overlayfs)", os.Getenv("PATH"))
	}
	out, err := exec.Command(path, "--version").CombinedOutput()
	if err != nil {
		return path, "", unsupported(err, "%s --version failed (output %q): reinstall fuse-overlayfs", path, bytes.TrimSpace(out))
	}
	for _, line := range strings.Split(string(out), "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "fuse-overlayfs: version "); ok {
			return path, strings.TrimSpace(v), nil
		}
	}
	return path, "", unsupported(nil, "%s --version did not print a version (%q): is it really fuse-overlayfs?", path, bytes.TrimSpace(out))
}

func checkFuseDevice() error {
	st, err := os.Stat(fuseDevice)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return unsupported(err, "%s does not exist: load the fuse kernel module (modprobe fuse; the kernel needs CONFIG_FUSE_FS), or in a container pass the device in (--device /dev/fuse)", fuseDevice)
		}
		return unsupported(err, "cannot stat %s", fuseDevice)
	}
	if st.Mode()&os.ModeCharDevice == 0 {
		return unsupported(nil, "%s is not a character device (mode %v): recreate it with mknod %s c 10 229", fuseDevice, st.Mode(), fuseDevice)
	}
	f, err := os.OpenFile(fuseDevice, os.O_RDWR, 0)
	if err != nil {
		if errors.Is(err, os.ErrPermission) {
			return unsupported(err, "cannot open %s read-write as uid %d (mode %v): give it mode 0666 as distributions do (chmod 0666 %s), or run as a user that may open it", fuseDevice, os.Getuid(), st.Mode().Perm(), fuseDevice)
		}
		return unsupported(err, "cannot open %s", fuseDevice)
	}
	return f.Close()
}

// probeMount mounts a read-only overlay of two lower directories inside root,
// the way containers will get them, reads a file of each, and unmounts. It
// returns the open-files limit of the fuse-overlayfs server it started.
func probeMount(root string) (openFiles uint64, err error) {
	if err := os.MkdirAll(root, 0o700); err != nil {
		return 0, unsupported(err, "cannot create the snapshotter root %s", root)
	}
	dir, err := os.MkdirTemp(root, ".probe-")
	if err != nil {
		return 0, unsupported(err, "cannot create a probe directory in %s: the root must be a writable directory", root)
	}
	defer func() {
		if rerr := os.RemoveAll(dir); rerr != nil && err == nil {
			err = unsupported(rerr, "cannot remove the probe directory %s", dir)
		}
	}()
	lower1, lower2, target := filepath.Join(dir, "l1"), filepath.Join(dir, "l2"), filepath.Join(dir, "m")
	for _, d := range []string{lower1, lower2, target} {
		if err := os.Mkdir(d, 0o755); err != nil {
			return 0, unsupported(err, "cannot prepare the probe mount in %s", dir)
		}
	}
	if err := os.WriteFile(filepath.Join(lower1, "a"), []byte("1"), 0o644); err != nil {
		return 0, unsupported(err, "cannot write in %s", dir)
	}
	if err := os.WriteFile(filepath.Join(lower2, "b"), []byte("2"), 0o644); err != nil {
		return 0, unsupported(err, "cannot write in %s", dir)
	}
	m := mount.Mount{Type: MountType, Source: "overlay", Options: []string{"lowerdir=" + lower2 + ":" + lower1}}
	if err := m.Mount(target); err != nil {
		return 0, unsupported(err, "probe mount of fuse-overlayfs in %s failed: the kernel must allow FUSE mounts here (inside a user namespace it needs Linux 4.18 or newer) and the backing filesystem must support what fuse-overlayfs needs", root)
	}
	defer func() {
		if uerr := unmount(target); uerr != nil && err == nil {
			err = unsupported(uerr, "cannot unmount the probe mount %s", target)
		}
	}()
	for name, want := range map[string]string{"a": "1", "b": "2"} {
		got, err := os.ReadFile(filepath.Join(target, name))
		if err != nil || string(got) != want {
			return 0, unsupported(err, "probe mount of fuse-overlayfs in %s does not show its lower directories (reading %s gave %q, want %q)", root, name, got, want)
		}
	}
	return serverOpenFiles(target), nil
}

// checkForms refuses a root on which no form of whiteout or opaque marker
// stays visible once written (layer.ProbeForms, as the differ uses it):
// layers that delete files would come out wrong there.
func checkForms(root string) error {
	f := layer.ProbeForms(root)
	if f.Invisible == "" {
		return nil
	}
	return unsupported(nil, "the snapshotter root %s is on a filesystem where %s do not stay visible once written (a fuse-overlayfs mount hides them): layers that delete files cannot be stored there; put the root on another filesystem (a kernel overlay, ext4, xfs or tmpfs work)", root, f.Invisible)
}

// unmount unmounts target, detaching it lazily when it is busy so the probe
// never leaves a mount behind.
func unmount(target string) error {
	err := unix.Unmount(target, 0)
	if err == nil || errors.Is(err, unix.EINVAL) {
		return nil
	}
	return unix.Unmount(target, unix.MNT_DETACH)
}
