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
)

// Registry is a running Debian docker-registry (CNCF distribution) that
// listens on 127.0.0.1 and stores its data in a private directory.
type Registry struct {
	// Addr is host:port, e.g. 127.0.0.1:40123.
	Addr string
	// Dir holds the configuration, the storage and the log.
	Dir string

	cmd  *exec.Cmd
	done chan struct{}
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
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	r := &Registry{Addr: addr, Dir: dir, cmd: cmd, done: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		close(r.done)
	}()
	client := &http.Client{Timeout: 2 * time.Second}
	err = Poll(30*time.Second, 50*time.Millisecond, func() error {
		select {
		case <-r.done:
			log, _ := os.ReadFile(logPath)
			return fmt.Errorf("docker-registry exited: %s", log)
		default:
		}
		resp, err := client.Get("http://" + addr + "/v2/")
		if err != nil {
			return err
		}
		_ = resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("GET /v2/: %s", resp.Status)
		}
		return nil
	})
	if err != nil {
		_ = r.Stop()
		return nil, err
	}
	return r, nil
}

// Stop ends the registry by its PID (SIGTERM, then SIGKILL after 10s).
func (r *Registry) Stop() error {
	select {
	case <-r.done:
		return nil
	default:
	}
	_ = r.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-r.done:
		return nil
	case <-time.After(10 * time.Second):
	}
	_ = r.cmd.Process.Kill()
	<-r.done
	return nil
}

// PID returns the registry's process ID.
func (r *Registry) PID() int { return r.cmd.Process.Pid }
