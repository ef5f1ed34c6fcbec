package harness

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// BuildkitOptions configures a buildkitd with its containerd worker only.
type BuildkitOptions struct {
	// Dir is a private, empty directory: root, socket, config, TMPDIR, the
	// OpenTelemetry socket and the log live under it.
	Dir string
	// Containerd is the containerd socket the worker uses.
	Containerd string
	// Snapshotter is the worker's snapshotter (default fuse-overlayfs).
	Snapshotter string
	// Registry (host:port), when set, is reached over plain HTTP, for base
	// images and pushes.
	Registry string
	// Rootless runs the worker's containers as rootless ones: for a
	// buildkitd that is root in a user namespace (RootlessKit).
	Rootless bool
}

// Buildkitd is a running buildkitd from bin/.
type Buildkitd struct {
	Dir, Address, Root, ConfigPath, LogPath, Bin string

	proc *testutil.Process
}

// BuildkitConfig returns buildkitd.toml for a registry (host:port) reached
// over plain HTTP, for base images and pushes ("" when there is none).
func BuildkitConfig(registry string) string {
	if registry == "" {
		return ""
	}
	return fmt.Sprintf("[registry.%q]\n  http = true\n  insecure = true\n", registry)
}

// StartBuildkitd starts bin/buildkitd with only its containerd worker and
// waits until buildctl reaches it. buildkitd's OpenTelemetry socket (default
// /run/buildkit/otel-grpc.sock) and the mounts it makes in $TMPDIR are kept
// inside opts.Dir.
func StartBuildkitd(ctx context.Context, opts BuildkitOptions) (*Buildkitd, error) {
	bin, err := BinDir()
	if err != nil {
		return nil, err
	}
	for _, b := range []string{"buildkitd", "buildctl"} {
		if _, err := os.Stat(filepath.Join(bin, b)); err != nil {
			return nil, fmt.Errorf("bin/%s is missing (run `make binaries`): %w", b, err)
		}
	}
	if opts.Snapshotter == "" {
		opts.Snapshotter = SnapshotterID
	}
	b := &Buildkitd{
		Dir:        opts.Dir,
		Address:    "unix://" + filepath.Join(opts.Dir, "buildkitd.sock"),
		Root:       filepath.Join(opts.Dir, "root"),
		ConfigPath: filepath.Join(opts.Dir, "buildkitd.toml"),
		LogPath:    filepath.Join(opts.Dir, "buildkitd.log"),
		Bin:        bin,
	}
	tmp := filepath.Join(opts.Dir, "tmp")
	for _, d := range []string{b.Root, tmp} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, err
		}
	}
	cfg := BuildkitConfig(opts.Registry)
	if err := os.WriteFile(b.ConfigPath, []byte(cfg), 0o600); err != nil {
		return nil, err
	}
	logf, err := os.OpenFile(b.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open buildkitd log: %w", err)
	}
	defer func() { _ = logf.Close() }()
	cmd := exec.Command(filepath.Join(bin, "buildkitd"), b.Args(opts)...)
	cmd.Env = append(EnvWithout(os.Environ(), "PATH", "TMPDIR"), "PATH="+SystemPath(bin), "TMPDIR="+tmp)
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if b.proc, err = testutil.StartProcess("buildkitd", cmd); err != nil {
		return nil, err
	}
	err = b.proc.WaitReady(60*time.Second, func() error {
		_, err := b.Buildctl(ctx, "debug", "workers")
		return err
	})
	if err != nil {
		_ = b.Stop()
		return nil, fmt.Errorf("buildkitd did not come up: %w\nlog tail:\n%s", err, b.LogTail(40))
	}
	return b, nil
}

// Args returns buildkitd's command line: the configuration file, and the
// paths it would otherwise take on the host.
func (b *Buildkitd) Args(opts BuildkitOptions) []string {
	args := []string{
		"--config", b.ConfigPath,
		"--root", b.Root,
		"--addr", b.Address,
		"--otel-socket-path", filepath.Join(opts.Dir, "otel-grpc.sock"),
		// RUN steps share the host's network: no CNI plugins needed.
		"--containerd-worker-net", "host",
		"--debug",
	}
	args = append(args, WorkerFlags(opts.Containerd, opts.Snapshotter)...)
	if opts.Rootless {
		// Set at all, even to false, buildkitd wants a user namespace.
		args = append(args, "--containerd-worker-rootless")
	}
	return args
}

// WorkerFlags are the buildkitd flags that docs/building.md shows: only
// the containerd worker, on containerd at socket, with snapshotter.
func WorkerFlags(socket, snapshotter string) []string {
	return []string{
		"--oci-worker=false", "--containerd-worker=true",
		"--containerd-worker-addr", socket,
		"--containerd-worker-snapshotter", snapshotter,
	}
}

// PID returns buildkitd's process ID.
func (b *Buildkitd) PID() int { return b.proc.PID() }

// Stop ends buildkitd by its PID (SIGTERM, SIGKILL after 30 s) and waits
// for it.
func (b *Buildkitd) Stop() error {
	if b.proc == nil || !b.proc.Running() {
		return nil
	}
	if err := b.proc.Stop(30 * time.Second); err != nil && !isSignalExit(err) {
		return err
	}
	return nil
}

// Buildctl runs bin/buildctl against this buildkitd.
func (b *Buildkitd) Buildctl(ctx context.Context, args ...string) (string, error) {
	return Run(ctx, 20*time.Minute, nil, filepath.Join(b.Bin, "buildctl"), append([]string{"--addr", b.Address}, args...)...)
}

// BuildArgs are the arguments of `buildctl build` that docs/building.md
// shows: the Dockerfile in dir, dir as the context, output as --output.
func BuildArgs(dir, output string) []string {
	return []string{"build", "--frontend", "dockerfile.v0",
		"--local", "context=" + dir, "--local", "dockerfile=" + dir,
		"--output", output}
}

// Build runs `buildctl build` (BuildArgs) of the Dockerfile in dir with
// output as its --output, e.g. "type=image,name=REF,push=true", and
// returns its plain progress output (buildctl writes it to stderr).
func (b *Buildkitd) Build(ctx context.Context, dir, output string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 20*time.Minute)
	defer cancel()
	args := append([]string{"--addr", b.Address}, append(BuildArgs(dir, output), "--progress", "plain")...)
	cmd := exec.CommandContext(ctx, filepath.Join(b.Bin, "buildctl"), args...)
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("buildctl %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// LogTail returns the last n lines of buildkitd's log.
func (b *Buildkitd) LogTail(n int) string { return fileTail(b.LogPath, n) }
