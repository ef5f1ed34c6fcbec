package integration

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fosnap/fuseoverlayfs/integration/internal/harness"
	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// systemdUnit is the [Service] section of a systemd unit, parsed.
type systemdUnit struct {
	text        string
	execStart   string
	environment []string // Environment= assignments, in order
	values      map[string]string
}

// parseUnit reads the keys of a unit's [Service] section that the tests
// act on; the last assignment of a key wins, Environment= accumulates.
func parseUnit(t *testing.T, text string) systemdUnit {
	t.Helper()
	u := systemdUnit{text: text, values: map[string]string{}}
	section := ""
	for _, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		if strings.HasPrefix(line, "[") {
			section = line
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok || section != "[Service]" {
			continue
		}
		switch k {
		case "ExecStart":
			u.execStart = v
		case "Environment":
			u.environment = append(u.environment, v)
		}
		u.values[k] = v
	}
	if u.execStart == "" {
		t.Fatalf("unit has no ExecStart:\n%s", text)
	}
	return u
}

// unitProcess is a unit's ExecStart, started as systemd would start it for
// the user: its own process group standing in for the unit's cgroup.
type unitProcess struct {
	proc *testutil.Process // the unit's main process
	out  *harness.Output
}

// startUnit runs execStart as the user with env. systemd splits ExecStart
// into words itself; for the units here (double-quoted paths without
// specials, or an explicit /bin/sh -c '...') the shell's splitting is the
// same, and exec keeps the process the unit's main process. A unit still
// running at the end of the test is killed with its process group.
func startUnit(t *testing.T, r *rootlessRun, env []string, execStart string) *unitProcess {
	t.Helper()
	u := &unitProcess{out: &harness.Output{}}
	var err error
	if u.proc, err = r.user.StartShell("unit process", env, u.out, "exec "+execStart); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := u.proc.KillLeftover(true); err != nil {
			t.Errorf("%v:\n%s", err, u.out)
		}
	})
	return u
}

// waitSocket waits until socket accepts connections, failing the test if
// the unit's process exits first.
func (u *unitProcess) waitSocket(t *testing.T, socket string) {
	t.Helper()
	if err := u.proc.WaitReady(30*time.Second, testutil.SocketReady(socket)); err != nil {
		t.Fatalf("nothing serves on %s: %v\n%s", socket, err, u.out)
	}
}

// assertMainIs checks that the unit's main process (the one systemd
// signals) runs program: every wrapper on the way exec'd it.
func (u *unitProcess) assertMainIs(t *testing.T, program string) {
	t.Helper()
	if cmdline := cmdlineOf(u.proc.PID()); !strings.HasPrefix(cmdline, program+"\x00") {
		t.Errorf("the unit's main process %d is %q, want %s", u.proc.PID(), strings.ReplaceAll(cmdline, "\x00", " "), program)
	}
}

// stopMixed stops the unit as systemd does with KillMode=mixed: SIGTERM to
// the main process only, which must exit 0 on its own; what is left of the
// unit afterwards would get SIGKILL, so nothing may be left.
func (u *unitProcess) stopMixed(t *testing.T) {
	t.Helper()
	if !u.proc.Running() {
		t.Fatalf("the unit's main process exited before its SIGTERM: %v\n%s", u.proc.Err(), u.out)
	}
	if err := u.proc.Terminate(30 * time.Second); errors.Is(err, testutil.ErrStillRunning) {
		t.Fatalf("%v:\n%s", err, u.out)
	} else if err != nil {
		t.Errorf("the unit's main process after SIGTERM: %v, want exit status 0:\n%s", err, u.out)
	}
	if left := processGroup(u.proc.PID()); len(left) > 0 {
		t.Errorf("processes of the unit outlived its main process (KillMode=mixed would SIGKILL them): %v", left)
		_ = u.proc.SignalGroup(syscall.SIGKILL)
	}
}

// processGroup lists the processes (not zombies) of process group pgid with
// their command lines.
func processGroup(pgid int) []string {
	var found []string
	stats, _ := filepath.Glob("/proc/[0-9]*/stat")
	for _, p := range stats {
		data, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		// pid (comm) state ppid pgrp ...: comm may hold spaces.
		rest := string(data)
		if i := strings.LastIndexByte(rest, ')'); i >= 0 {
			rest = rest[i+1:]
		}
		f := strings.Fields(rest)
		if len(f) < 3 || f[0] == "Z" || f[2] != fmt.Sprint(pgid) {
			continue
		}
		pid := filepath.Base(filepath.Dir(p))
		found = append(found, pid+" "+strings.ReplaceAll(cmdlineOf(atoi(pid)), "\x00", " "))
	}
	return found
}

func atoi(s string) int {
	var n int
	_, _ = fmt.Sscan(s, &n)
	return n
}
