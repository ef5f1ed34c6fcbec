package harness

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/user"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// aptTimeout bounds apt-get; adminTimeout bounds useradd and usermod.
const (
	aptTimeout   = 10 * time.Minute
	adminTimeout = time.Minute
)

// RootlessUserName is the unprivileged account the rootless tests run as.
const RootlessUserName = "fosnap-rootless"

// subIDCount is the size of the subordinate ID ranges the user gets: one
// full 16-bit range, what useradd hands out by default and what images
// with IDs up to 65534 (nobody) need.
const subIDCount = 65536

// RootlessUser is an unprivileged user with subordinate UID and GID ranges.
type RootlessUser struct {
	Name     string
	UID, GID int
}

// rootlessPackages maps a command the rootless tests need to the Debian
// package that has it.
var rootlessPackages = []struct{ cmd, pkg string }{
	{"rootlesskit", "rootlesskit"},
	{"newuidmap", "uidmap"},
	{"newgidmap", "uidmap"},
	{"slirp4netns", "slirp4netns"},
}

var (
	rootlessMu   sync.Mutex
	rootlessUser *RootlessUser
)

// SetupRootless prepares this host, as real root, for running as an
// unprivileged user under RootlessKit: it installs rootlesskit, uidmap and
// slirp4netns with apt-get when they are missing, creates the user
// RootlessUserName with subordinate UID and GID ranges in /etc/subuid and
// /etc/subgid, and gives /dev/fuse mode 0666 (what distributions' udev rule
// sets; nothing sets it on hosts without udev). Each step is done only when
// needed, so calling it again is cheap.
func SetupRootless() (*RootlessUser, error) {
	rootlessMu.Lock()
	defer rootlessMu.Unlock()
	if rootlessUser != nil {
		return rootlessUser, nil
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("setting up the rootless user needs root")
	}
	if err := ensureRootlessPackages(); err != nil {
		return nil, err
	}
	u, err := ensureUser(RootlessUserName)
	if err != nil {
		return nil, err
	}
	if err := ensureSubIDs(u); err != nil {
		return nil, err
	}
	if err := ensureFuseMode(); err != nil {
		return nil, err
	}
	rootlessUser = u
	return u, nil
}

func ensureRootlessPackages() error {
	var missing []string
	for _, p := range rootlessPackages {
		if _, err := LookPath(p.cmd); err != nil && !contains(missing, p.pkg) {
			missing = append(missing, p.pkg)
		}
	}
	if len(missing) == 0 {
		return nil
	}
	env := append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	ctx := context.Background()
	if _, err := Run(ctx, aptTimeout, env, "apt-get", "update", "-qq"); err != nil {
		return fmt.Errorf("install %v: %w", missing, err)
	}
	args := append([]string{"install", "-y", "-qq", "--no-install-recommends"}, missing...)
	if _, err := Run(ctx, aptTimeout, env, "apt-get", args...); err != nil {
		return fmt.Errorf("install %v: %w", missing, err)
	}
	for _, p := range rootlessPackages {
		if _, err := LookPath(p.cmd); err != nil {
			return fmt.Errorf("%s still missing after installing %s: %w", p.cmd, p.pkg, err)
		}
	}
	return nil
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

func ensureUser(name string) (*RootlessUser, error) {
	u, err := user.Lookup(name)
	if err != nil {
		var unknown user.UnknownUserError
		if !errors.As(err, &unknown) {
			return nil, fmt.Errorf("look up user %s: %w", name, err)
		}
		// No home directory: the tests give the user a private HOME.
		useradd, err := LookPath("useradd")
		if err != nil {
			return nil, err
		}
		if _, err := Run(context.Background(), adminTimeout, nil, useradd,
			"--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
			"--user-group", "--comment", "fuse-overlayfs snapshotter rootless tests", name); err != nil {
			return nil, fmt.Errorf("create user %s: %w", name, err)
		}
		if u, err = user.Lookup(name); err != nil {
			return nil, fmt.Errorf("look up user %s after creating it: %w", name, err)
		}
	}
	uid, err := strconv.Atoi(u.Uid)
	if err != nil {
		return nil, err
	}
	gid, err := strconv.Atoi(u.Gid)
	if err != nil {
		return nil, err
	}
	return &RootlessUser{Name: name, UID: uid, GID: gid}, nil
}

// subIDRange is one line of /etc/subuid or /etc/subgid.
type subIDRange struct {
	owner        string
	start, count int
}

func readSubIDs(path string) ([]subIDRange, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }()
	var ranges []subIDRange
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Split(strings.TrimSpace(sc.Text()), ":")
		if len(fields) != 3 {
			continue
		}
		start, err1 := strconv.Atoi(fields[1])
		count, err2 := strconv.Atoi(fields[2])
		if err1 != nil || err2 != nil {
			continue
		}
		ranges = append(ranges, subIDRange{fields[0], start, count})
	}
	return ranges, sc.Err()
}

// ensureSubIDs gives the user a range of subIDCount subordinate UIDs and
// GIDs unless it has one, placed after every range already handed out.
func ensureSubIDs(u *RootlessUser) error {
	for _, f := range []struct{ path, flag string }{{"/etc/subuid", "--add-subuids"}, {"/etc/subgid", "--add-subgids"}} {
		ranges, err := readSubIDs(f.path)
		if err != nil {
			return err
		}
		start := 100000
		ok := false
		for _, r := range ranges {
			if (r.owner == u.Name || r.owner == strconv.Itoa(u.UID)) && r.count >= subIDCount {
				ok = true
			}
			start = max(start, r.start+r.count)
		}
		if ok {
			continue
		}
		usermod, err := LookPath("usermod")
		if err != nil {
			return err
		}
		arg := fmt.Sprintf("%d-%d", start, start+subIDCount-1)
		if _, err := Run(context.Background(), adminTimeout, nil, usermod, f.flag, arg, u.Name); err != nil {
			return fmt.Errorf("give %s subordinate IDs in %s: %w", u.Name, f.path, err)
		}
	}
	return nil
}

func ensureFuseMode() error {
	st, err := os.Stat("/dev/fuse")
	if err != nil {
		return fmt.Errorf("/dev/fuse: %w (load the fuse module: modprobe fuse)", err)
	}
	if st.Mode().Perm() == 0o666 {
		return nil
	}
	if err := os.Chmod("/dev/fuse", 0o666); err != nil {
		return fmt.Errorf("chmod 0666 /dev/fuse: %w", err)
	}
	return nil
}

// Command returns a command that runs argv as the user inside a new
// RootlessKit: its own user and mount namespaces, the host network
// (--net=host, so 127.0.0.1 is the host's), and writable copies of /etc
// and /run. stateDir is RootlessKit's state directory; env is the whole
// environment. Everything that must see the same mounts (containerd, the
// snapshotter, the test program) has to run below this one process.
func (u *RootlessUser) Command(ctx context.Context, stateDir string, env []string, argv ...string) (*exec.Cmd, error) {
	rk, err := LookPath("rootlesskit")
	if err != nil {
		return nil, err
	}
	args := append([]string{"--net=host", "--copy-up=/etc", "--copy-up=/run", "--state-dir=" + stateDir}, argv...)
	cmd := exec.CommandContext(ctx, rk, args...)
	cmd.Env = env
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Credential: &syscall.Credential{Uid: uint32(u.UID), Gid: uint32(u.GID), Groups: []uint32{}},
		Setpgid:    true,
		// RootlessKit must not outlive a test binary that dies.
		Pdeathsig: syscall.SIGKILL,
	}
	return cmd, nil
}

// Shell returns a command that runs script with /bin/sh -c as the user
// (outside any namespace of its own), with env as the whole environment.
func (u *RootlessUser) Shell(ctx context.Context, env []string, script string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "/bin/sh", "-c", script)
	cmd.Env = env
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Credential: &syscall.Credential{Uid: uint32(u.UID), Gid: uint32(u.GID), Groups: []uint32{}},
		Setpgid:    true,
		Pdeathsig:  syscall.SIGKILL,
	}
	return cmd
}

// StartShell starts script as the user (see Shell), with its output going to
// out, as a process the caller stops by PID. It leads its own process group,
// so KillLeftover(true) ends what it started too. Wait gives processes that
// hold out open 5 s to let go after it exited.
func (u *RootlessUser) StartShell(name string, env []string, out io.Writer, script string) (*testutil.Process, error) {
	cmd := u.Shell(context.Background(), env, script)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.WaitDelay = 5 * time.Second
	return testutil.StartProcess(name, cmd)
}

// ExternalRegistry describes a registry that another process runs (the
// outer test of a rootless test runs it as root): Stop does nothing.
func ExternalRegistry(addr string) *Registry { return &Registry{Addr: addr} }
