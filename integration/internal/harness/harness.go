// Package harness starts and stops the real parts that the end-to-end tests
// and the demo need: a private containerd built with the fuse-overlayfs
// plugin, a Debian docker-registry on 127.0.0.1, and the clients (ctr,
// nerdctl, crictl) pointed at them. It also finds what a test leaves behind:
// FUSE mounts and processes that belong to a private containerd root.
package harness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// SnapshotterID is the name containerd knows our snapshotter by.
const SnapshotterID = "fuse-overlayfs"

// RepoRoot returns the repository's root directory: the nearest parent of
// the working directory that holds go.mod.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("go.mod not found above the working directory")
		}
		dir = parent
	}
}

// BinDir returns the repository's bin/ directory, where `make binaries`
// puts containerd, ctr, the shim, nerdctl and crictl.
func BinDir() (string, error) {
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	return filepath.Join(root, "bin"), nil
}

// ConfigFile returns the path of the containerd configuration that the README
// shows.
func ConfigFile() (string, error) {
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	return filepath.Join(root, "config", "containerd.toml"), nil
}

// Binaries built by `make binaries` into bin/.
var Binaries = []string{"containerd", "ctr", "containerd-shim-runc-v2", "nerdctl", "crictl"}

// HostTools are the programs the tests take from the host (Debian packages).
var HostTools = []string{"runc", "fuse-overlayfs", "mount.fuse3", "fusermount3", "docker-registry"}

// Missing lists every prerequisite of the end-to-end tests that this host
// lacks: root, a usable /dev/fuse, the binaries in bin/ and the host tools.
// Each entry says what to do about it.
func Missing() []string {
	var missing []string
	if os.Geteuid() != 0 {
		missing = append(missing, "not running as root (the tests mount FUSE file systems and run runc)")
	}
	if f, err := os.OpenFile("/dev/fuse", os.O_RDWR, 0); err != nil {
		missing = append(missing, fmt.Sprintf("/dev/fuse cannot be opened read-write: %v", err))
	} else {
		_ = f.Close()
	}
	bin, err := BinDir()
	if err != nil {
		return append(missing, err.Error())
	}
	for _, b := range Binaries {
		if _, err := os.Stat(filepath.Join(bin, b)); err != nil {
			missing = append(missing, fmt.Sprintf("bin/%s is missing (run `make binaries`)", b))
		}
	}
	for _, tool := range HostTools {
		if _, err := LookPath(tool); err != nil {
			missing = append(missing, fmt.Sprintf("%s not found on PATH (run `make deps`)", tool))
		}
	}
	if _, err := exec.LookPath("go"); err != nil {
		missing = append(missing, "the go command is not on PATH (needed to build the in-container probe)")
	}
	return missing
}

// SystemPath is the PATH the private containerd runs with: bin/ first, then
// the usual system directories (runc, fuse-overlayfs, mount.fuse3).
func SystemPath(bin string) string {
	return strings.Join([]string{bin, "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"}, ":")
}

// LookPath finds a host tool on PATH or in the sbin directories, which a
// non-login root shell may lack on PATH.
func LookPath(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, dir := range []string{"/usr/local/sbin", "/usr/sbin", "/sbin"} {
		p := filepath.Join(dir, name)
		if st, err := os.Stat(p); err == nil && !st.IsDir() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s: %w", name, exec.ErrNotFound)
}

// Run runs a command with a deadline and returns its standard output. The
// error includes the command line, its standard output and its standard
// error, so a caller can report it as is.
func Run(ctx context.Context, timeout time.Duration, env []string, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	if env != nil {
		cmd.Env = env
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	cmd.WaitDelay = 5 * time.Second
	err := cmd.Run()
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("timed out after %s: %w", timeout, err)
		}
		return stdout.String(), fmt.Errorf("%s %s: %w\nstdout:\n%s\nstderr:\n%s", filepath.Base(name), strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String(), nil
}

// Poll calls cond until it returns nil or the deadline passes; it returns the
// last error then.
func Poll(timeout, interval time.Duration, cond func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("still failing after %s: %w", timeout, err)
		}
		time.Sleep(interval)
	}
}

// BuildProbe compiles integration/cmd/probe as a static binary into dir and
// returns its content.
func BuildProbe(dir string) ([]byte, error) {
	root, err := RepoRoot()
	if err != nil {
		return nil, err
	}
	out := filepath.Join(dir, "probe")
	cmd := exec.Command("go", "build", "-trimpath", "-o", out, "./integration/cmd/probe")
	cmd.Dir = root
	cmd.Env = append(EnvWithout(os.Environ(), "CGO_ENABLED", "GOOS"), "CGO_ENABLED=0", "GOOS=linux")
	if b, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("build probe: %w\n%s", err, b)
	}
	return os.ReadFile(out)
}
