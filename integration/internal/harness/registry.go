package harness

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// Registry is a running Debian docker-registry (CNCF distribution) that
// listens on 127.0.0.1 and stores its data in a private directory.
type Registry struct {
	// Addr is host:port, e.g. 127.0.0.1:40123.
	Addr string
	// Dir holds the configuration, the storage and the log.
	Dir string

	// proc is nil for an ExternalRegistry.
	proc *testutil.Process
}

// StartRegistry starts docker-registry on a free port of 127.0.0.1 and waits
// until it answers /v2/.
func StartRegistry(dir string) (*Registry, error) {
	bin, err := LookPath("docker-registry")
	if err != nil {
		return nil, fmt.Errorf("%w (install the Debian package docker-registry, e.g. `make deps`)", err)
	}
	var lastErr error
	// The port is picked free, then handed to the registry: another program
	// may take it in between, so try a few ports.
	for range 3 {
		r, err := startRegistry(bin, dir)
		if err == nil {
			return r, nil
		}
		lastErr = err
	}
	return nil, lastErr
}

func startRegistry(bin, dir string) (*Registry, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	addr := l.Addr().String()
	_ = l.Close()
	if err := os.MkdirAll(filepath.Join(dir, "data"), 0o700); err != nil {
		return nil, err
	}
	cfg := fmt.Sprintf(`version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
`, filepath.Join(dir, "data"), addr)
	cfgPath := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		return nil, err
	}
	logPath := filepath.Join(dir, "registry.log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	defer func() { _ = logf.Close() }()
	cmd := exec.Command(bin, "serve", cfgPath)
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	proc, err := testutil.StartProcess("docker-registry", cmd)
	if err != nil {
		return nil, err
	}
	r := &Registry{Addr: addr, Dir: dir, proc: proc}
	if err := proc.WaitReady(30*time.Second, v2Ready(addr)); err != nil {
		_ = r.Stop()
		log, _ := os.ReadFile(logPath)
		return nil, fmt.Errorf("%w; log:\n%s", err, log)
	}
	return r, nil
}

// v2Ready is a readiness check: nil once the registry at addr answers
// GET /v2/ with 200.
func v2Ready(addr string) func() error {
	client := &http.Client{Timeout: 2 * time.Second}
	return func() error {
		resp, err := client.Get("http://" + addr + "/v2/")
		if err != nil {
			return err
		}
		_ = resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("GET /v2/: %s", resp.Status)
		}
		return nil
	}
}

// Stop ends the registry by its PID (SIGTERM, then SIGKILL after 10s). It
// does not fail: the registry's exit status on SIGTERM does not matter, and
// one that had to be killed is gone all the same.
func (r *Registry) Stop() error {
	if r.proc != nil {
		_ = r.proc.Stop(10 * time.Second)
	}
	return nil
}

// PID returns the registry's process ID.
func (r *Registry) PID() int { return r.proc.PID() }
