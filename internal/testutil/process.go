//go:build linux

package testutil

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"
)

// Process is a child process a test started: it is waited for in the
// background, readiness can be awaited, and it is stopped by its PID
// (SIGTERM, a grace period, then SIGKILL). The end-to-end harness, the
// rootless tests and the gRPC server's tests all start their processes
// through it.
type Process struct {
	// Name is used in messages.
	Name string
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

// StartProcess starts cmd and waits for it in the background.
func StartProcess(name string, cmd *exec.Cmd) (*Process, error) {
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &Process{Name: name, cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// PID returns the process ID.
func (p *Process) PID() int { return p.cmd.Process.Pid }

// Done is closed once the process exited.
func (p *Process) Done() <-chan struct{} { return p.done }

// Running reports whether the process is still alive.
func (p *Process) Running() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// Err returns what Wait returned; call it after Done is closed.
func (p *Process) Err() error { return p.err }

// Signal sends sig to the process by its PID.
func (p *Process) Signal(sig syscall.Signal) error {
	if err := p.cmd.Process.Signal(sig); err != nil {
		return fmt.Errorf("signal %s (pid %d): %w", p.Name, p.PID(), err)
	}
	return nil
}

// Wait waits up to timeout for the exit and returns the exit code (-1 when
// killed by a signal). Past the timeout it kills the process and fails.
func (p *Process) Wait(timeout time.Duration) (int, error) {
	select {
	case <-p.done:
	case <-time.After(timeout):
		p.Kill()
		return -1, fmt.Errorf("%s (pid %d) did not exit within %s; killed it", p.Name, p.PID(), timeout)
	}
	var exit *exec.ExitError
	if errors.As(p.err, &exit) {
		return exit.ExitCode(), nil
	}
	return 0, p.err
}

// ErrStillRunning is wrapped by Terminate's error when the process outlived
// the grace period.
var ErrStillRunning = errors.New("still running")

// killWait bounds KillLeftover's wait after SIGKILL: a process stuck in the
// kernel (a hung FUSE request) may not end, and a cleanup must not hang.
const killWait = 30 * time.Second

// WaitSuccess is Wait that also fails unless the exit status is 0.
func (p *Process) WaitSuccess(timeout time.Duration) error {
	code, err := p.Wait(timeout)
	if err == nil && code != 0 {
		return fmt.Errorf("%s (pid %d): %w", p.Name, p.PID(), p.err)
	}
	return err
}

// Stop sends SIGTERM and waits up to grace for the exit; past it, it kills
// the process by its PID and fails. It returns what Wait returned.
func (p *Process) Stop(grace time.Duration) error {
	err := p.Terminate(grace)
	if !errors.Is(err, ErrStillRunning) {
		return err
	}
	p.Kill()
	return fmt.Errorf("%s (pid %d) ignored SIGTERM for %s and was killed", p.Name, p.PID(), grace)
}

// Terminate sends SIGTERM by PID and waits up to grace for the exit, and
// returns what Wait returned. A process still running then is left running
// (for a cleanup to kill, e.g. with its process group) and the error wraps
// ErrStillRunning.
func (p *Process) Terminate(grace time.Duration) error {
	if !p.Running() {
		return p.err
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	if !p.Exited(grace) {
		return fmt.Errorf("%s (pid %d) ignored SIGTERM for %s: %w", p.Name, p.PID(), grace, ErrStillRunning)
	}
	return p.err
}

// Exited waits up to timeout for the exit, without killing, and reports
// whether the process exited.
func (p *Process) Exited(timeout time.Duration) bool {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case <-p.done:
		return true
	case <-timer.C:
		return false
	}
}

// Kill sends SIGKILL by PID if the process still runs, waits for it, and
// reports whether it had to.
func (p *Process) Kill() bool {
	if !p.Running() {
		return false
	}
	_ = p.cmd.Process.Kill()
	<-p.done
	return true
}

// KillLeftover is for a test's cleanup: nil if the process already exited,
// else it sends SIGKILL by PID (to the whole process group the process
// leads, with group: it must have been started with Setpgid) and returns an
// error saying it was still running. It waits at most 30 s after SIGKILL;
// the error then says the process survived it.
func (p *Process) KillLeftover(group bool) error {
	if !p.Running() {
		return nil
	}
	pid := p.PID()
	if group {
		pid = -pid
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	what := "killed it"
	if group {
		what = "killed its process group"
	}
	if !p.Exited(killWait) {
		return fmt.Errorf("%s (pid %d) was still running and survives SIGKILL for %s", p.Name, p.PID(), killWait)
	}
	return fmt.Errorf("%s (pid %d) was still running; %s", p.Name, p.PID(), what)
}

// SignalGroup sends sig to the process group the process leads (it must
// have been started with Setpgid).
func (p *Process) SignalGroup(sig syscall.Signal) error {
	if err := syscall.Kill(-p.PID(), sig); err != nil {
		return fmt.Errorf("signal the process group of %s (pid %d): %w", p.Name, p.PID(), err)
	}
	return nil
}

// WaitReady polls ready every 50 ms until it returns nil, the process exits
// or timeout passes.
func (p *Process) WaitReady(timeout time.Duration, ready func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := ready()
		if err == nil {
			return nil
		}
		select {
		case <-p.done:
			return fmt.Errorf("%s (pid %d) exited before it was ready (%w): %w", p.Name, p.PID(), p.err, err)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s (pid %d) not ready after %s: %w", p.Name, p.PID(), timeout, err)
		}
	}
}

// SocketReady returns a readiness check for WaitReady: nil once the unix
// socket at path accepts a connection.
func SocketReady(path string) func() error {
	return func() error {
		c, err := net.Dial("unix", path)
		if err != nil {
			return err
		}
		return c.Close()
	}
}

// NotifySocket is a stand-in for systemd's notification socket: a process
// started with NOTIFY_SOCKET=Path sends READY=1, STOPPING=1... to it.
type NotifySocket struct {
	// Path is the socket's path, for NOTIFY_SOCKET.
	Path string
	conn *net.UnixConn
}

// NewNotifySocket listens on dir/notify.sock.
func NewNotifySocket(dir string) (*NotifySocket, error) {
	path := filepath.Join(dir, "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return nil, fmt.Errorf("listen on notify socket %s: %w", path, err)
	}
	return &NotifySocket{Path: path, conn: conn}, nil
}

// Env returns the NOTIFY_SOCKET variable to give a process.
func (n *NotifySocket) Env() string { return "NOTIFY_SOCKET=" + n.Path }

// Expect waits up to timeout for the next message and fails unless it is
// want.
func (n *NotifySocket) Expect(want string, timeout time.Duration) error {
	if err := n.conn.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return fmt.Errorf("set notify socket deadline: %w", err)
	}
	buf := make([]byte, 4096)
	k, err := n.conn.Read(buf)
	if err != nil {
		return fmt.Errorf("wait for %q on NOTIFY_SOCKET: %w", want, err)
	}
	if got := string(buf[:k]); got != want {
		return fmt.Errorf("NOTIFY_SOCKET got %q, want %q", got, want)
	}
	return nil
}

// Close stops listening and removes the socket.
func (n *NotifySocket) Close() error {
	err := n.conn.Close()
	if rerr := os.Remove(n.Path); rerr != nil && !errors.Is(rerr, os.ErrNotExist) && err == nil {
		err = rerr
	}
	return err
}
