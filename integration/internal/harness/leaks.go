package harness

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// Mount is one line of /proc/self/mountinfo.
type Mount struct {
	Point, FSType, Source string
}

// Proc is a process found by its command line.
type Proc struct {
	PID     int
	Cmdline string
}

// Leftovers are the mounts and processes that belong to a private
// containerd directory.
type Leftovers struct {
	Mounts []Mount
	Procs  []Proc
}

// Empty reports whether nothing was left.
func (l Leftovers) Empty() bool { return len(l.Mounts) == 0 && len(l.Procs) == 0 }

func (l Leftovers) String() string {
	var b strings.Builder
	for _, m := range l.Mounts {
		fmt.Fprintf(&b, "mount %s type %s source %s\n", m.Point, m.FSType, m.Source)
	}
	for _, p := range l.Procs {
		fmt.Fprintf(&b, "process %d: %s\n", p.PID, p.Cmdline)
	}
	return b.String()
}

// Mounts lists this mount namespace's mounts (moby/sys/mountinfo, the
// parser recovery.go uses).
func Mounts() ([]Mount, error) {
	infos, err := mountinfo.GetMounts(nil)
	if err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	mounts := make([]Mount, 0, len(infos))
	for _, m := range infos {
		mounts = append(mounts, Mount{Point: m.Mountpoint, FSType: m.FSType, Source: m.Source})
	}
	return mounts, nil
}

// FindLeftovers lists the mounts at or below dir and the processes (other
// than this one) whose command line names dir: fuse-overlayfs serving a
// layer, a shim, a container, or containerd itself.
func FindLeftovers(dir string) (Leftovers, error) {
	var l Leftovers
	dir = filepath.Clean(dir)
	mounts, err := Mounts()
	if err != nil {
		return l, err
	}
	for _, m := range mounts {
		if m.Point == dir || strings.HasPrefix(m.Point, dir+"/") {
			l.Mounts = append(l.Mounts, m)
		}
	}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return l, err
	}
	self := os.Getpid()
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		raw, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || len(raw) == 0 {
			continue // gone, or a kernel thread
		}
		cmdline := strings.TrimSpace(strings.ReplaceAll(string(raw), "\x00", " "))
		if strings.Contains(cmdline, dir) {
			l.Procs = append(l.Procs, Proc{PID: pid, Cmdline: cmdline})
		}
	}
	return l, nil
}

// WaitNoLeftovers polls until nothing of dir is left or timeout passes, and
// returns what is still there then. fuse-overlayfs exits a moment after
// its unmount, so a single look could report a process that is on its way
// out.
func WaitNoLeftovers(dir string, timeout time.Duration) (Leftovers, error) {
	var l Leftovers
	err := Poll(timeout, 100*time.Millisecond, func() error {
		var err error
		l, err = FindLeftovers(dir)
		if err != nil {
			return err
		}
		if !l.Empty() {
			return fmt.Errorf("leftovers:\n%s", l)
		}
		return nil
	})
	if err != nil && l.Empty() {
		return l, err
	}
	return l, nil
}

// CleanLeftovers kills the listed processes by PID and detaches the listed
// mounts, deepest first, so that the directory can be removed.
func CleanLeftovers(l Leftovers) error {
	for _, p := range l.Procs {
		_ = syscall.Kill(p.PID, syscall.SIGKILL)
	}
	mounts := append([]Mount(nil), l.Mounts...)
	sort.Slice(mounts, func(i, j int) bool { return len(mounts[i].Point) > len(mounts[j].Point) })
	var errs []string
	for _, m := range mounts {
		if err := unix.Unmount(m.Point, unix.MNT_DETACH); err != nil && err != unix.EINVAL && err != unix.ENOENT {
			errs = append(errs, fmt.Sprintf("umount %s: %v", m.Point, err))
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("%s", strings.Join(errs, "; "))
	}
	return nil
}
