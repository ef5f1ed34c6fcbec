package harness

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"
	"github.com/pelletier/go-toml/v2"
)

// Options configures a private containerd.
type Options struct {
	// Dir is a private, empty-or-reused directory; root, state, socket,
	// config and logs live under it. Reusing it restarts the same daemon.
	Dir string
	// Binary is the containerd binary in bin/ (default "containerd").
	Binary string
	// Path is containerd's PATH (default SystemPath(bin)).
	Path string
	// Registry, when set (host:port), gets a hosts.toml that makes
	// containerd talk plain HTTP to it (CRI and transfer service).
	Registry string
	// Edit, when set, changes the parsed configuration before it is written.
	Edit func(cfg map[string]any)
}

// Containerd is a running private containerd.
type Containerd struct {
	Dir, Root, State, Address, ConfigPath, LogPath, HostsDir, Bin string

	opts Options
	proc *testutil.Process
}

// LoadConfig reads the README's containerd configuration and points the
// places where containerd keeps things on the host (NRI socket, opt
// directory, registry hosts, CNI) into dir, so that several private
// containerds can run side by side and leave nothing behind.
func LoadConfig(dir string) (map[string]any, error) {
	path, err := ConfigFile()
	if err != nil {
		return nil, err
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	cfg := map[string]any{}
	if err := toml.Unmarshal(data, &cfg); err != nil {
		return nil, fmt.Errorf("parse %s: %w", path, err)
	}
	hosts := filepath.Join(dir, "certs.d")
	Set(cfg, filepath.Join(dir, "nri.sock"), "plugins", "io.containerd.nri.v1.nri", "socket_path")
	Set(cfg, filepath.Join(dir, "opt"), "plugins", "io.containerd.internal.v1.opt", "path")
	Set(cfg, hosts, "plugins", "io.containerd.cri.v1.images", "registry", "config_path")
	Set(cfg, hosts, "plugins", "io.containerd.transfer.v1.local", "config_path")
	Set(cfg, filepath.Join(dir, "cni", "net.d"), "plugins", "io.containerd.cri.v1.runtime", "cni", "conf_dir")
	Set(cfg, []string{filepath.Join(dir, "cni", "bin")}, "plugins", "io.containerd.cri.v1.runtime", "cni", "bin_dirs")
	if !hasCapSysResource() {
		// Without CAP_SYS_RESOURCE (some sandboxes drop it) runc cannot
		// lower a pod sandbox's oom_score_adj to CRI's -998 and fails with
		// "can't get final child's PID from pipe: EOF".
		Set(cfg, true, "plugins", "io.containerd.cri.v1.runtime", "restrict_oom_score_adj")
	}
	return cfg, nil
}

// hasCapSysResource reports whether this process has CAP_SYS_RESOURCE in
// its effective set.
func hasCapSysResource() bool {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			caps, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			return err == nil && caps&(1<<24) != 0 // CAP_SYS_RESOURCE is 24
		}
	}
	return false
}

// Set stores value at the nested key path in a parsed TOML document,
// creating the tables on the way.
func Set(cfg map[string]any, value any, path ...string) {
	m := cfg
	for _, k := range path[:len(path)-1] {
		next, ok := m[k].(map[string]any)
		if !ok {
			next = map[string]any{}
			m[k] = next
		}
		m = next
	}
	m[path[len(path)-1]] = value
}

// StartContainerd starts containerd from bin/ with the README configuration
// and waits until it answers on its socket.
func StartContainerd(ctx context.Context, opts Options) (*Containerd, error) {
	bin, err := BinDir()
	if err != nil {
		return nil, err
	}
	if opts.Binary == "" {
		opts.Binary = "containerd"
	}
	if opts.Path == "" {
		opts.Path = SystemPath(bin)
	}
	c := &Containerd{
		Dir:        opts.Dir,
		Root:       filepath.Join(opts.Dir, "root"),
		State:      filepath.Join(opts.Dir, "state"),
		Address:    filepath.Join(opts.Dir, "containerd.sock"),
		ConfigPath: filepath.Join(opts.Dir, "containerd.toml"),
		LogPath:    filepath.Join(opts.Dir, "containerd.log"),
		HostsDir:   filepath.Join(opts.Dir, "certs.d"),
		Bin:        bin,
		opts:       opts,
	}
	for _, d := range []string{c.Root, c.State, c.HostsDir, filepath.Join(opts.Dir, "cni", "net.d"), filepath.Join(opts.Dir, "cni", "bin")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, err
		}
	}
	cfg, err := LoadConfig(opts.Dir)
	if err != nil {
		return nil, err
	}
	if opts.Edit != nil {
		opts.Edit(cfg)
	}
	data, err := toml.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(c.ConfigPath, data, 0o600); err != nil {
		return nil, err
	}
	if opts.Registry != "" {
		if err := WriteHostsConfig(c.HostsDir, opts.Registry); err != nil {
			return nil, err
		}
	}
	if err := c.Start(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

// WriteHostsConfig writes dir/<registry>/hosts.toml telling containerd to use
// plain HTTP for registry (host:port).
func WriteHostsConfig(dir, registry string) error {
	d := filepath.Join(dir, registry)
	if err := os.MkdirAll(d, 0o700); err != nil {
		return err
	}
	hosts := fmt.Sprintf("server = %q\n\n[host.%q]\n  capabilities = [\"pull\", \"resolve\", \"push\"]\n",
		"http://"+registry, "http://"+registry)
	return os.WriteFile(filepath.Join(d, "hosts.toml"), []byte(hosts), 0o600)
}

// Start starts the daemon (again, after Stop or Kill) on the same root,
// state and configuration, and waits until it answers on its socket.
func (c *Containerd) Start(ctx context.Context) error {
	logf, err := os.OpenFile(c.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("open containerd log: %w", err)
	}
	// The child has its own descriptor once started.
	defer func() { _ = logf.Close() }()
	cmd := exec.Command(filepath.Join(c.Bin, c.opts.Binary),
		"--config", c.ConfigPath, "--root", c.Root, "--state", c.State,
		"--address", c.Address, "--log-level", "debug")
	cmd.Env = append(EnvWithout(os.Environ(), "PATH"), "PATH="+c.opts.Path)
	cmd.Stdout = logf
	cmd.Stderr = logf
	// Own process group: a ^C to the test must not kill containerd before
	// the test has cleaned up through it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if c.proc, err = testutil.StartProcess("containerd", cmd); err != nil {
		return err
	}
	err = c.proc.WaitReady(60*time.Second, func() error {
		_, err := c.Ctr(ctx, "version")
		return err
	})
	if err != nil {
		_ = c.Stop()
		return fmt.Errorf("containerd did not come up: %w\nlog tail:\n%s", err, c.LogTail(40))
	}
	return nil
}

// PID returns the daemon's process ID.
func (c *Containerd) PID() int { return c.proc.PID() }

// Running reports whether the daemon process is still alive.
func (c *Containerd) Running() bool { return c.proc != nil && c.proc.Running() }

// Stop ends containerd by its PID: SIGTERM, then SIGKILL if it has not
// exited within 30 seconds.
func (c *Containerd) Stop() error {
	if !c.Running() {
		return nil
	}
	if err := c.proc.Stop(30 * time.Second); err != nil && !isSignalExit(err) {
		return err
	}
	return nil
}

// Kill ends containerd with SIGKILL by its PID, as a crash would.
func (c *Containerd) Kill() bool { return c.Running() && c.proc.Kill() }

// isSignalExit reports whether err is only the exit status of a process
// that ended on a signal or with a non-zero status, which containerd may
// do on SIGTERM.
func isSignalExit(err error) bool {
	var exit *exec.ExitError
	return errors.As(err, &exit)
}

// Restart stops containerd and starts it again on the same root and state.
func (c *Containerd) Restart(ctx context.Context) error {
	if err := c.Stop(); err != nil {
		return err
	}
	return c.Start(ctx)
}

// LogTail returns the last n lines of containerd's log.
func (c *Containerd) LogTail(n int) string { return fileTail(c.LogPath, n) }

// fileTail returns the last n lines of the file at path, or why it cannot
// be read.
func fileTail(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func (c *Containerd) env() []string {
	return append(EnvWithout(os.Environ(), "PATH", "CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE", "CONTAINERD_SNAPSHOTTER"),
		"PATH="+SystemPath(c.Bin))
}

// Ctr runs bin/ctr against this containerd.
func (c *Containerd) Ctr(ctx context.Context, args ...string) (string, error) {
	return Run(ctx, 5*time.Minute, c.env(), filepath.Join(c.Bin, "ctr"), append([]string{"--address", c.Address}, args...)...)
}

// NerdctlArgs are the global flags that keep nerdctl's state and
// configuration private to this containerd.
func (c *Containerd) NerdctlArgs(namespace string) []string {
	return []string{
		"--address", c.Address, "--namespace", namespace,
		"--data-root", filepath.Join(c.Dir, "nerdctl"),
		"--hosts-dir", c.HostsDir,
		"--cni-path", filepath.Join(c.Dir, "cni", "bin"),
		"--cni-netconfpath", filepath.Join(c.Dir, "cni", "net.d"),
	}
}

// Nerdctl runs bin/nerdctl against this containerd.
func (c *Containerd) Nerdctl(ctx context.Context, namespace string, args ...string) (string, error) {
	env := append(c.env(), "NERDCTL_TOML="+filepath.Join(c.Dir, "nerdctl.toml"))
	return Run(ctx, 5*time.Minute, env, filepath.Join(c.Bin, "nerdctl"), append(c.NerdctlArgs(namespace), args...)...)
}

// NerdctlIn runs bin/nerdctl against this containerd in the working
// directory dir, as a user in that directory types it (`nerdctl build .`).
func (c *Containerd) NerdctlIn(ctx context.Context, dir, namespace string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 20*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(c.Bin, "nerdctl"), append(c.NerdctlArgs(namespace), args...)...)
	cmd.Dir = dir
	cmd.Env = append(c.env(), "NERDCTL_TOML="+filepath.Join(c.Dir, "nerdctl.toml"))
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("nerdctl %s (in %s): %w\n%s", strings.Join(args, " "), dir, err, out)
	}
	return string(out), nil
}

// Crictl runs bin/crictl against this containerd's CRI endpoint.
func (c *Containerd) Crictl(ctx context.Context, args ...string) (string, error) {
	cfg := filepath.Join(c.Dir, "crictl.yaml")
	if _, err := os.Stat(cfg); err != nil {
		yaml := fmt.Sprintf("runtime-endpoint: unix://%s\nimage-endpoint: unix://%s\ntimeout: 120\n", c.Address, c.Address)
		if err := os.WriteFile(cfg, []byte(yaml), 0o600); err != nil {
			return "", err
		}
	}
	return Run(ctx, 5*time.Minute, c.env(), filepath.Join(c.Bin, "crictl"), append([]string{"--config", cfg}, args...)...)
}

// Sweep deletes every task and container left in any namespace, so that no
// shim or container mount outlives the test. It returns what it had to
// delete: a passing test should have left nothing.
func (c *Containerd) Sweep(ctx context.Context) ([]string, error) {
	var removed []string
	out, err := c.Ctr(ctx, "namespaces", "ls", "-q")
	if err != nil {
		return nil, err
	}
	var errs []error
	for _, ns := range strings.Fields(out) {
		tasks, err := c.Ctr(ctx, "-n", ns, "tasks", "ls", "-q")
		if err != nil {
			errs = append(errs, err)
		}
		for _, id := range strings.Fields(tasks) {
			removed = append(removed, ns+"/task/"+id)
			_, _ = c.Ctr(ctx, "-n", ns, "tasks", "kill", "-s", "SIGKILL", id)
			_ = Poll(10*time.Second, 100*time.Millisecond, func() error {
				_, err := c.Ctr(ctx, "-n", ns, "tasks", "delete", "-f", id)
				return err
			})
		}
		ctrs, err := c.Ctr(ctx, "-n", ns, "containers", "ls", "-q")
		if err != nil {
			errs = append(errs, err)
		}
		for _, id := range strings.Fields(ctrs) {
			removed = append(removed, ns+"/container/"+id)
			if _, err := c.Ctr(ctx, "-n", ns, "containers", "delete", id); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return removed, errors.Join(errs...)
}

// EnvWithout returns env without the named variables.
func EnvWithout(env []string, names ...string) []string {
	var out []string
next:
	for _, kv := range env {
		for _, n := range names {
			if strings.HasPrefix(kv, n+"=") {
				continue next
			}
		}
		out = append(out, kv)
	}
	return out
}
