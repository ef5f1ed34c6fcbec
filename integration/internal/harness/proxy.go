package harness

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"
	"github.com/pelletier/go-toml/v2"
)

// Names in config/containerd-proxy.toml.
const (
	// ProxyConfigFile is the configuration of a stock containerd using
	// containerd-fuse-overlayfs-grpc, as the README shows it.
	ProxyConfigFile = "containerd-proxy.toml"
	// ProxyDifferID is the diff proxy plugin's name.
	ProxyDifferID = "fuse-overlayfs-differ"
	// ContentSubdir is containerd's content store below its root.
	ContentSubdir = "io.containerd.content.v1.content"
)

// UseProxyConfig turns cfg, a configuration LoadConfig read, into the
// README's proxy configuration (config/containerd-proxy.toml) over the same
// private paths, with both proxy plugins pointed at socket and the
// snapshotter's exported root at root.
func UseProxyConfig(cfg map[string]any, socket, root string) error {
	repo, err := RepoRoot()
	if err != nil {
		return err
	}
	data, err := os.ReadFile(filepath.Join(repo, "config", ProxyConfigFile))
	if err != nil {
		return err
	}
	proxyCfg := map[string]any{}
	if err := toml.Unmarshal(data, &proxyCfg); err != nil {
		return fmt.Errorf("parse %s: %w", ProxyConfigFile, err)
	}
	// The built-in plugin's sections name a plugin and a differ that a
	// stock containerd lacks.
	if plugins, ok := cfg["plugins"].(map[string]any); ok {
		delete(plugins, "io.containerd.snapshotter.v1.fuse-overlayfs")
		delete(plugins, "io.containerd.service.v1.diff-service")
		if tr, ok := plugins["io.containerd.transfer.v1.local"].(map[string]any); ok {
			delete(tr, "unpack_config")
		}
	}
	mergeTOML(cfg, proxyCfg)
	for _, name := range []string{SnapshotterID, ProxyDifferID} {
		if _, ok := proxyCfg["proxy_plugins"].(map[string]any)[name]; !ok {
			return fmt.Errorf("%s has no proxy plugin %q", ProxyConfigFile, name)
		}
		Set(cfg, socket, "proxy_plugins", name, "address")
	}
	Set(cfg, root, "proxy_plugins", SnapshotterID, "exports", "root")
	return nil
}

// mergeTOML copies src into dst, merging tables and replacing the rest.
func mergeTOML(dst, src map[string]any) {
	for k, v := range src {
		if sv, ok := v.(map[string]any); ok {
			if dv, ok := dst[k].(map[string]any); ok {
				mergeTOML(dv, sv)
				continue
			}
		}
		dst[k] = v
	}
}

// ProxyServer is bin/containerd-fuse-overlayfs-grpc, running.
type ProxyServer struct {
	Socket, Root, ContentDir, LogPath string
	// Args are more flags for the server (e.g. --metrics-address).
	Args []string

	proc *testutil.Process
}

// StartProxyServer starts bin/containerd-fuse-overlayfs-grpc on socket and
// root, reading layers from contentDir, logging at debug level to logPath,
// with a private NOTIFY_SOCKET, and waits for its READY=1.
func StartProxyServer(socket, root, contentDir, logPath string) (*ProxyServer, error) {
	p := &ProxyServer{Socket: socket, Root: root, ContentDir: contentDir, LogPath: logPath}
	if err := p.Start(); err != nil {
		return nil, err
	}
	return p, nil
}

// Start starts the server (again, after Stop or Kill) and waits for its
// READY=1, which it sends once its socket listens.
func (p *ProxyServer) Start() error {
	bin, err := BinDir()
	if err != nil {
		return err
	}
	notifyDir, err := os.MkdirTemp("", "notify-")
	if err != nil {
		return fmt.Errorf("create notify directory: %w", err)
	}
	defer func() { _ = os.RemoveAll(notifyDir) }()
	notify, err := testutil.NewNotifySocket(notifyDir)
	if err != nil {
		return err
	}
	defer func() { _ = notify.Close() }()
	logf, err := os.OpenFile(p.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("open proxy server log: %w", err)
	}
	// The child has its own descriptor once started.
	defer func() { _ = logf.Close() }()
	cmd := exec.Command(filepath.Join(bin, "containerd-fuse-overlayfs-grpc"), p.Socket, p.Root)
	cmd.Args = append(cmd.Args, append([]string{"--content-dir", p.ContentDir, "--log-level", "debug"}, p.Args...)...)
	cmd.Env = append(os.Environ(), notify.Env())
	cmd.Stdout, cmd.Stderr = logf, logf
	if p.proc, err = testutil.StartProcess("containerd-fuse-overlayfs-grpc", cmd); err != nil {
		return err
	}
	// The deadline bounds a server that hangs.
	if err := notify.Expect("READY=1", 30*time.Second); err != nil {
		p.Kill()
		log, _ := os.ReadFile(p.LogPath)
		return fmt.Errorf("containerd-fuse-overlayfs-grpc did not report READY=1: %w; log:\n%s", err, log)
	}
	return nil
}

// PID returns the server's process ID.
func (p *ProxyServer) PID() int { return p.proc.PID() }

// Done is closed once the server exited.
func (p *ProxyServer) Done() <-chan struct{} { return p.proc.Done() }

// Running reports whether the server is still alive.
func (p *ProxyServer) Running() bool { return p.proc.Running() }

// Stop sends SIGTERM and waits up to 30 s; it fails unless the server
// exited with status 0 and removed its socket.
func (p *ProxyServer) Stop() error {
	if !p.Running() {
		return p.proc.Err()
	}
	if err := p.proc.Stop(30 * time.Second); err != nil {
		return fmt.Errorf("containerd-fuse-overlayfs-grpc after SIGTERM: %w (want exit status 0)", err)
	}
	if _, err := os.Lstat(p.Socket); err == nil {
		return fmt.Errorf("socket %s still there after the server exited", p.Socket)
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("look for the socket after the server exited: %w", err)
	}
	return nil
}

// Kill ends the server by its PID if it still runs, and reports whether
// it had to.
func (p *ProxyServer) Kill() bool { return p.proc.Kill() }

// Output collects a command's output while it runs, safe to read meanwhile.
type Output struct {
	mu sync.Mutex
	b  strings.Builder
}

func (o *Output) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.b.Write(p)
}

// String returns the output so far.
func (o *Output) String() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.b.String()
}
