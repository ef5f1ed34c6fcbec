//go:build linux

package fuseoverlayfs

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/fosnap/fuseoverlayfs/internal/layer"
)

// Diagnose runs the host checks of Check one by one, and a few more that
// Check does not need, and returns one finding per check: fuse-overlayfs and
// its version, the mount.fuse3 helper, /dev/fuse (its mode and whether this
// user may open it), a probe mount in root, the whiteout and opaque forms
// root's filesystem keeps visible, the open-files limit fuse-overlayfs
// servers get, the user's subordinate ID ranges (not root only) and whether
// the kernel's overlayfs works here for this user. A check whose
// prerequisite failed is reported as failed too, saying which.
// It never leaves a mount behind; root is created when missing.
func Diagnose(root string) []Finding {
	var out []Finding
	// As the snapshotter would, so that the checks that write in the root
	// run even when an earlier one failed.
	_ = os.MkdirAll(root, 0o700)
	add := func(check string, s Status, found, fix string) {
		out = append(out, Finding{Check: check, Status: s, Found: found, Fix: fix})
	}
	path, version, err := findFuseOverlayfs()
	fuseOK := err == nil
	if fuseOK {
		add(CheckFuseOverlayfs, StatusOK, fmt.Sprintf("%s, version %s", path, version), "")
	} else {
		add(CheckFuseOverlayfs, StatusFail, reason(err), "install fuse-overlayfs (Debian/Ubuntu: apt-get install fuse-overlayfs; Fedora: dnf install fuse-overlayfs) and put its directory on containerd's PATH")
	}
	helper, err := exec.LookPath("mount.fuse3")
	helperOK := err == nil
	if helperOK {
		add(CheckMountHelper, StatusOK, helper, "")
	} else {
		add(CheckMountHelper, StatusFail, "mount.fuse3 not found on PATH ("+os.Getenv("PATH")+")", "install fuse3 (apt-get install fuse3) and put /usr/sbin (or /sbin) on containerd's PATH")
	}
	mode, isChar := "missing", false
	if st, err := os.Stat(fuseDevice); err == nil {
		mode = fmt.Sprintf("%04o", st.Mode().Perm())
		if isChar = st.Mode()&os.ModeCharDevice != 0; !isChar {
			mode += " (not a character device)"
		}
	}
	err = checkFuseDevice()
	devOK := err == nil
	if devOK {
		add(CheckFuseDevice, StatusOK, fmt.Sprintf("%s mode %s, opened read-write as uid %d", fuseDevice, mode, os.Geteuid()), "")
	} else {
		fix := fmt.Sprintf("chmod 0666 %s (the mode distributions ship), or run as a user who may open it", fuseDevice)
		switch {
		case errors.Is(err, os.ErrNotExist):
			fix = "load the fuse module (modprobe fuse), or pass the device into the container (--device /dev/fuse)"
		case mode != "missing" && !isChar:
			fix = "recreate it: mknod /dev/fuse c 10 229"
		}
		add(CheckFuseDevice, StatusFail, fmt.Sprintf("mode %s: %s", mode, reason(err)), fix)
	}
	var openFiles uint64
	probeOK := false
	switch {
	case !fuseOK || !helperOK || !devOK:
		add(CheckProbeMount, StatusFail, "not tried: "+strings.Join(failedNames(out), ", ")+" failed", "fix the checks above first")
	default:
		if openFiles, err = probeMount(root); err != nil {
			add(CheckProbeMount, StatusFail, reason(err), "put the root on a local filesystem this user can write (ext4, xfs, tmpfs, a kernel overlay); inside a user namespace FUSE needs Linux 4.18 or newer")
		} else {
			probeOK = true
			add(CheckProbeMount, StatusOK, "a two-layer fuse-overlayfs mount in "+root+" showed both layers", "")
		}
	}
	if st, err := os.Stat(root); err != nil || !st.IsDir() {
		add(CheckWhiteoutForms, StatusFail, fmt.Sprintf("root %s is not a directory: %v", root, err), "create the root or give --root a directory")
	} else {
		f := layer.ProbeForms(root)
		found := "whiteouts as " + whiteoutForm(f) + ", opaque directories as xattr " + f.OpaqueXattr
		if f.Invisible != "" {
			add(CheckWhiteoutForms, StatusFail, fmt.Sprintf("on %s (%s) %s do not stay visible once written", root, fsName(root), f.Invisible),
				"put the root on another filesystem (a kernel overlay, ext4, xfs or tmpfs work); a fuse-overlayfs mount hides these markers")
		} else {
			add(CheckWhiteoutForms, StatusOK, fmt.Sprintf("%s on %s", found, fsName(root)), "")
		}
	}
	if !probeOK {
		openFiles = hardNoFile()
	}
	switch {
	case openFiles == 0:
		add(CheckOpenFiles, StatusWarn, "cannot read RLIMIT_NOFILE", "")
	case openFiles < minOpenFiles:
		add(CheckOpenFiles, StatusWarn, fmt.Sprintf("fuse-overlayfs servers get RLIMIT_NOFILE %d, under the recommended %d: busy containers will see EMFILE", openFiles, minOpenFiles),
			"LimitNOFILE=1048576 in containerd's systemd unit (or of containerd-fuse-overlayfs-grpc), or ulimit -n 1048576 before starting it")
	default:
		add(CheckOpenFiles, StatusOK, fmt.Sprintf("fuse-overlayfs servers get RLIMIT_NOFILE %s", limitString(openFiles)), "")
	}
	if os.Geteuid() != 0 {
		out = append(out, subordinateIDs())
	}
	out = append(out, kernelOverlay(root))
	return out
}

// reason turns a host-check error into its message, without the
// ErrUnsupported prefix and the error class.
func reason(err error) string {
	s := strings.TrimPrefix(err.Error(), ErrUnsupported.Error()+": ")
	return strings.Replace(s, ": "+errdefs.ErrFailedPrecondition.Error(), "", 1)
}

func failedNames(fs []Finding) []string {
	var names []string
	for _, f := range fs {
		if f.Status == StatusFail {
			names = append(names, f.Check)
		}
	}
	return names
}

func whiteoutForm(f layer.Forms) string {
	if f.DeviceWhiteouts {
		return "0/0 character devices"
	}
	return ".wh.NAME files"
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

func hardNoFile() uint64 {
	var lim unix.Rlimit
	if unix.Getrlimit(unix.RLIMIT_NOFILE, &lim) != nil {
		return 0
	}
	return lim.Max
}

func limitString(n uint64) string {
	if n == unix.RLIM_INFINITY {
		return "unlimited"
	}
	return strconv.FormatUint(n, 10)
}

// subordinateIDs reports the ranges /etc/subuid and /etc/subgid give this
// user: rootless containers with more than one ID need at least 65536.
func subordinateIDs() Finding {
	f := Finding{Check: CheckSubordinateIDs}
	name := strconv.Itoa(os.Geteuid())
	if u, err := user.LookupId(name); err == nil {
		name = u.Username
	}
	uids := subIDCount("/etc/subuid", name, os.Geteuid())
	gids := subIDCount("/etc/subgid", name, os.Getegid())
	f.Found = fmt.Sprintf("user %s has %d subordinate uids and %d subordinate gids", name, uids, gids)
	if uids >= 65536 && gids >= 65536 {
		f.Status = StatusOK
		return f
	}
	f.Status = StatusWarn
	f.Fix = fmt.Sprintf("images with files of other owners need ranges of 65536: usermod --add-subuids 100000-165535 --add-subgids 100000-165535 %s", name)
	return f
}

// subIDCount sums the ranges of the file (name:start:count lines) that
// belong to the user, by name or by number.
func subIDCount(path, name string, id int) uint64 {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	var n uint64
	s := bufio.NewScanner(bytes.NewReader(data))
	for s.Scan() {
		f := strings.Split(strings.TrimSpace(s.Text()), ":")
		if len(f) != 3 || (f[0] != name && f[0] != strconv.Itoa(id)) {
			continue
		}
		if c, err := strconv.ParseUint(f[2], 10, 32); err == nil {
			n += c
		}
	}
	return n
}

// kernelOverlay tries a real kernel overlay mount in a directory of root (in
// a mount namespace of its own, and a user namespace when not root, so that
// nothing is left mounted) and writes a file through it. Whether it works is
// never a failure: it only says which snapshotter suits this host better.
func kernelOverlay(root string) Finding {
	f := Finding{Check: CheckKernelOverlayfs, Status: StatusOK}
	err := tryKernelOverlay(root)
	who := "root"
	if os.Geteuid() != 0 {
		who = fmt.Sprintf("uid %d (in a user namespace)", os.Geteuid())
	}
	if err == nil {
		f.Found = fmt.Sprintf("kernel overlayfs works here for %s: containerd's overlayfs snapshotter would be faster (FUSE puts a process in every file access)", who)
		f.Fix = "consider containerd's overlayfs snapshotter (--snapshotter overlayfs) on this host"
		return f
	}
	f.Found = fmt.Sprintf("kernel overlayfs does not work here for %s (%v): fuse-overlayfs is the right snapshotter", who, err)
	return f
}

func tryKernelOverlay(root string) error {
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		return fmt.Errorf("cannot tell: %w", err)
	}
	dir, err := os.MkdirTemp(root, ".probe-ovl-")
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
	opts := fmt.Sprintf("lowerdir=%s/l,upperdir=%s/u,workdir=%s/w", dir, dir, dir)
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
