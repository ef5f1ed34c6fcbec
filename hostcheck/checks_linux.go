//go:build linux

package hostcheck

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/fosnap/fuseoverlayfs/internal/layer"
	"github.com/fosnap/fuseoverlayfs/internal/layout"
)

// table is every check, in the order they run.
var table = []check{
	{name: CheckFuseOverlayfs, atLoad: true, run: findFuseOverlayfs},
	{name: CheckMountHelper, atLoad: true, run: findMountHelper},
	{name: CheckFuseDevice, atLoad: true, run: openFuseDevice},
	{name: CheckProbeMount, atLoad: true, needs: []string{CheckFuseOverlayfs, CheckMountHelper, CheckFuseDevice}, run: probeMount},
	{name: CheckWhiteoutForms, atLoad: true, run: whiteoutForms},
	{name: CheckOpenFiles, atLoad: true, run: openFiles},
	{name: CheckSubordinateIDs, run: subordinateIDs},
	{name: CheckKernelOverlayfs, run: kernelOverlay},
}

// fuseDevice is a variable so tests can point the device check elsewhere.
var fuseDevice = "/dev/fuse"

func prepareRoot(root string) { _ = os.MkdirAll(root, 0o700) }

const installFuseOverlayfs = "install fuse-overlayfs (Debian/Ubuntu: apt-get install fuse-overlayfs; Fedora: dnf install fuse-overlayfs) and put its directory on containerd's PATH"

func findFuseOverlayfs(st *state) result {
	path, err := exec.LookPath(layout.ServerComm)
	if err != nil {
		return fail(err, fmt.Sprintf("fuse-overlayfs was not found on PATH (%s)", os.Getenv("PATH")), installFuseOverlayfs)
	}
	st.info.FuseOverlayfs = path
	out, err := exec.Command(path, "--version").CombinedOutput()
	if err != nil {
		return fail(err, fmt.Sprintf("%s --version failed (output %q)", path, bytes.TrimSpace(out)), "reinstall fuse-overlayfs")
	}
	for _, line := range strings.Split(string(out), "\n") {
		if v, found := strings.CutPrefix(strings.TrimSpace(line), "fuse-overlayfs: version "); found {
			st.info.Version = strings.TrimSpace(v)
			return ok(fmt.Sprintf("%s, version %s", path, st.info.Version))
		}
	}
	return fail(nil, fmt.Sprintf("%s --version did not print a version (%q)", path, bytes.TrimSpace(out)), "put the real fuse-overlayfs first on PATH, or "+installFuseOverlayfs)
}

func findMountHelper(st *state) result {
	path, err := exec.LookPath("mount.fuse3")
	if err != nil {
		return fail(err, fmt.Sprintf("the mount helper mount.fuse3 was not found on PATH (%s)", os.Getenv("PATH")),
			"install fuse3 (Debian/Ubuntu: apt-get install fuse3) and put its directory, usually /usr/sbin or /sbin, on containerd's PATH")
	}
	st.info.MountHelper = path
	return ok(path)
}

// openFuseDevice stats /dev/fuse once and opens it read-write, as
// fuse-overlayfs will.
func openFuseDevice(*state) result {
	fi, err := os.Stat(fuseDevice)
	if errors.Is(err, os.ErrNotExist) {
		return fail(err, fuseDevice+" does not exist",
			"load the fuse kernel module (modprobe fuse; the kernel needs CONFIG_FUSE_FS), or in a container pass the device in (--device /dev/fuse)")
	}
	if err != nil {
		return fail(err, "cannot stat "+fuseDevice, "run as a user who may see "+fuseDevice)
	}
	mode := fmt.Sprintf("mode %04o", fi.Mode().Perm())
	if fi.Mode()&os.ModeCharDevice == 0 {
		return fail(nil, fmt.Sprintf("%s is not a character device (%s, %v)", fuseDevice, mode, fi.Mode().Type()), "recreate it: mknod "+fuseDevice+" c 10 229")
	}
	f, err := os.OpenFile(fuseDevice, os.O_RDWR, 0)
	if err != nil {
		return fail(err, fmt.Sprintf("%s: cannot open %s read-write as uid %d", mode, fuseDevice, os.Geteuid()),
			fmt.Sprintf("chmod 0666 %s (the mode distributions ship), or run as a user who may open it", fuseDevice))
	}
	_ = f.Close()
	return ok(fmt.Sprintf("%s %s, opened read-write as uid %d", fuseDevice, mode, os.Geteuid()))
}

const fixRootFS = "put the root on a local filesystem this user can write (ext4, xfs, tmpfs, a kernel overlay); inside a user namespace FUSE needs Linux 4.18 or newer"

// probeMount mounts a read-only overlay of two lower directories inside the
// root, the way containers will get them, reads a file of each, and
// unmounts. It records the open-files limit of the server it started.
func probeMount(st *state) (r result) {
	if err := os.MkdirAll(st.root, 0o700); err != nil {
		return fail(err, "cannot create the snapshotter root "+st.root, fixRootFS)
	}
	dir, err := os.MkdirTemp(st.root, layout.ProbePrefix)
	if err != nil {
		return fail(err, "cannot create a probe directory in "+st.root+": the root must be a writable directory", fixRootFS)
	}
	defer func() {
		if err := os.RemoveAll(dir); err != nil && r.Status == StatusOK {
			r = fail(err, "cannot remove the probe directory "+dir, "remove it by hand; check what holds it (fuser -m)")
		}
	}()
	target, err := probeTree(dir)
	if err != nil {
		return fail(err, "cannot prepare the probe mount in "+dir, fixRootFS)
	}
	return mountProbe(st, dir, target)
}

// probeTree writes two lower directories l1 (file a) and l2 (file b) and a
// mount point m in dir.
func probeTree(dir string) (target string, err error) {
	for _, d := range []string{"l1", "l2", "m"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil {
			return "", err
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "l1", "a"), []byte("1"), 0o644); err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(dir, "l2", "b"), []byte("2"), 0o644); err != nil {
		return "", err
	}
	return filepath.Join(dir, "m"), nil
}

func mountProbe(st *state, dir, target string) (r result) {
	m := layout.Overlay([]string{filepath.Join(dir, "l2"), filepath.Join(dir, "l1")}, "", "")
	if err := m.Mount(target); err != nil {
		return fail(err, "probe mount of fuse-overlayfs in "+st.root+" failed",
			"the kernel must allow FUSE mounts here (inside a user namespace it needs Linux 4.18 or newer) and the backing filesystem must support what fuse-overlayfs needs; "+fixRootFS)
	}
	defer func() {
		if err := unmount(target); err != nil && r.Status == StatusOK {
			r = fail(err, "cannot unmount the probe mount "+target, "unmount it by hand (umount -l "+target+")")
		}
	}()
	for name, want := range map[string]string{"a": "1", "b": "2"} {
		got, err := os.ReadFile(filepath.Join(target, name))
		if err != nil || string(got) != want {
			return fail(err, fmt.Sprintf("probe mount of fuse-overlayfs in %s does not show its lower directories (reading %s gave %q, want %q)", st.root, name, got, want),
				"reinstall fuse-overlayfs; "+fixRootFS)
		}
	}
	st.info.OpenFiles = serverOpenFiles(target)
	return ok("a two-layer fuse-overlayfs mount in " + st.root + " showed both layers")
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

// whiteoutForms refuses a root on which no form of whiteout or opaque marker
// stays visible once written (layer.ProbeForms, as the differ uses it):
// layers that delete files would come out wrong there.
func whiteoutForms(st *state) result {
	if fi, err := os.Stat(st.root); err != nil || !fi.IsDir() {
		return fail(err, "the snapshotter root "+st.root+" is not a directory", "create the root, or give a directory as the root")
	}
	f := layer.ProbeForms(st.root)
	if f.Invisible != "" {
		return fail(nil, fmt.Sprintf("the snapshotter root %s is on a filesystem (%s) where %s do not stay visible once written (a fuse-overlayfs mount hides them): layers that delete files cannot be stored there", st.root, fsName(st.root), f.Invisible),
			"put the root on another filesystem (a kernel overlay, ext4, xfs or tmpfs work)")
	}
	form := ".wh.NAME files"
	if f.DeviceWhiteouts {
		form = "0/0 character devices"
	}
	return ok(fmt.Sprintf("whiteouts as %s, opaque directories as xattr %s on %s", form, f.OpaqueXattr, fsName(st.root)))
}

// fsName names the filesystem type dir is on, as statfs reports it.
func fsName(dir string) string {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return "unknown filesystem"
	}
	switch st.Type {
	case unix.EXT4_SUPER_MAGIC:
		return "ext4"
	case unix.XFS_SUPER_MAGIC:
		return "xfs"
	case unix.TMPFS_MAGIC:
		return "tmpfs"
	case unix.OVERLAYFS_SUPER_MAGIC:
		return "overlay"
	case unix.FUSE_SUPER_MAGIC:
		return "fuse"
	case unix.BTRFS_SUPER_MAGIC:
		return "btrfs"
	}
	return fmt.Sprintf("filesystem 0x%x", st.Type)
}

// kernelOverlay tries a real kernel overlay mount in a directory of the root
// (in a mount namespace of its own, and a user namespace when not root, so
// that nothing is left mounted) and writes a file through it. Whether it
// works is never a failure: it only says which snapshotter suits this host.
func kernelOverlay(st *state) result {
	who := "root"
	if os.Geteuid() != 0 {
		who = fmt.Sprintf("uid %d (in a user namespace)", os.Geteuid())
	}
	if err := tryKernelOverlay(st.root); err != nil {
		return ok(fmt.Sprintf("kernel overlayfs does not work here for %s (%v): fuse-overlayfs is the right snapshotter", who, err))
	}
	r := ok(fmt.Sprintf("kernel overlayfs works here for %s: containerd's overlayfs snapshotter would be faster (FUSE puts a process in every file access)", who))
	r.Fix = "consider containerd's overlayfs snapshotter (--snapshotter overlayfs) on this host"
	return r
}

func tryKernelOverlay(root string) error {
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		return fmt.Errorf("cannot tell: %w", err)
	}
	dir, err := os.MkdirTemp(root, layout.ProbePrefix+"ovl-")
	if err != nil {
		return err
	}
	defer func() { _ = os.RemoveAll(dir) }()
	for _, d := range []string{"l", "u", "w", "m"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil {
			return err
		}
	}
	args := []string{"--mount", "--propagation", "private"}
	if os.Geteuid() != 0 {
		args = append(args, "--user", "--map-root-user")
	}
	// The kernel's overlay takes the same three options as fuse-overlayfs.
	opts := strings.Join(layout.Overlay([]string{dir + "/l"}, dir+"/u", dir+"/w").Options, ",")
	args = append(args, "/bin/sh", "-c", `mount -t overlay overlay -o "$1" "$2" && echo y > "$2/probe"`, "sh", opts, dir+"/m")
	out, err := exec.Command(unshare, args...).CombinedOutput()
	if err != nil {
		return errors.New(strings.Join(strings.Fields(string(out)), " "))
	}
	if _, err := os.Stat(filepath.Join(dir, "u", "probe")); err != nil {
		return errors.New("a file written through the mount is not in its upper directory")
	}
	return nil
}
