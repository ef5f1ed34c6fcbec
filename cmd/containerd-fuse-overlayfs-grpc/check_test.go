package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"

	"github.com/fosnap/fuseoverlayfs/hostcheck"
	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// runCheckCmd runs `check --root root [--json]` as a child process (the test
// binary acting as the command) with the environment env and credentials
// cred (nil: this process's), and returns its text output, its JSON report
// (from a second run with --json) and its exit status.
func runCheckCmd(t *testing.T, exe, root string, env []string, cred *syscall.Credential) (string, checkReport, int) {
	t.Helper()
	var text string
	var rep checkReport
	var codes [2]int
	for i, args := range [][]string{{"check", "--root", root}, {"check", "--root", root, "--json"}} {
		cmd := exec.Command(exe, args...)
		cmd.Env = append(env, runMainEnv+"=1")
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			codes[i] = ee.ExitCode()
		} else if err != nil {
			t.Fatalf("run %v: %v", args, err)
		}
		if i == 0 {
			text = stdout.String()
			continue
		}
		if err := json.Unmarshal(stdout.Bytes(), &rep); err != nil {
			t.Fatalf("check --json printed no JSON report (%v):\n%s\nstderr: %s", err, stdout.String(), stderr.String())
		}
	}
	t.Logf("check --root %s (exit %d):\n%s", root, codes[0], text)
	if codes[0] != codes[1] {
		t.Fatalf("exit status %d without --json, %d with it", codes[0], codes[1])
	}
	lines := strings.Split(strings.TrimSpace(text), "\n")
	if len(lines) != len(rep.Checks) {
		t.Fatalf("%d lines of text but %d checks in the JSON report", len(lines), len(rep.Checks))
	}
	for i, c := range rep.Checks {
		if !strings.HasPrefix(lines[i], string(c.Status)+" ") || !strings.Contains(lines[i], " "+c.Check+" ") || !strings.Contains(probeName.ReplaceAllString(lines[i], ".probe-X"), probeName.ReplaceAllString(c.Found, ".probe-X")) {
			t.Fatalf("line %d %q does not say %+v", i, lines[i], c)
		}
		if c.Status != hostcheck.StatusOK && c.Fix == "" && c.Status != hostcheck.StatusWarn {
			t.Fatalf("check %s failed without a fix: %+v", c.Check, c)
		}
	}
	if rep.FormatVersion != 1 || rep.Root != root {
		t.Fatalf("report header: %+v", rep)
	}
	return text, rep, codes[0]
}

// probeName matches the random part of a probe directory's name, which
// differs between the two runs.
var probeName = regexp.MustCompile(`\.probe-[a-z-]*[0-9]+`)

// finding returns the finding of check, failing the test when there is none.
func finding(t *testing.T, rep checkReport, check string) hostcheck.Finding {
	t.Helper()
	for _, f := range rep.Checks {
		if f.Check == check {
			return f
		}
	}
	t.Fatalf("no %s check in %+v", check, rep.Checks)
	return hostcheck.Finding{}
}

func wantFinding(t *testing.T, rep checkReport, check string, status hostcheck.Status, found ...string) {
	t.Helper()
	f := finding(t, rep, check)
	if f.Status != status {
		t.Fatalf("check %s: status %s, want %s: %+v", check, f.Status, status, f)
	}
	for _, s := range found {
		if !strings.Contains(f.Found, s) {
			t.Fatalf("check %s: %q does not say %q", check, f.Found, s)
		}
	}
}

// raiseOpenFiles raises this process's open-files limit, which the
// children inherit, to what a systemd service gets, so that the open-files
// check is ok; it is restored afterwards. Without CAP_SYS_RESOURCE (some
// sandboxes) the hard limit cannot be raised: it returns false when the
// limit stays under 65536, and the check must then warn.
func raiseOpenFiles(t *testing.T) bool {
	t.Helper()
	var old syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &syscall.Rlimit{Cur: 1 << 20, Max: 1 << 20}); err != nil {
		t.Logf("cannot raise RLIMIT_NOFILE to 1048576 (%v): the hard limit stays %d", err, old.Max)
		return old.Max >= 65536
	}
	t.Cleanup(func() { _ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old) })
	return true
}

// wantOpenFiles checks the open-files finding: ok when the limit is high
// enough, otherwise a warning with the fix.
func wantOpenFiles(t *testing.T, rep checkReport, high bool) {
	t.Helper()
	if high {
		wantFinding(t, rep, hostcheck.CheckOpenFiles, hostcheck.StatusOK, "RLIMIT_NOFILE")
		return
	}
	wantFinding(t, rep, hostcheck.CheckOpenFiles, hostcheck.StatusWarn, "under the recommended 65536")
	if fix := finding(t, rep, hostcheck.CheckOpenFiles).Fix; !strings.Contains(fix, "LimitNOFILE=1048576") {
		t.Fatalf("open-files fix %q", fix)
	}
}

func testExe(t *testing.T) string {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return exe
}

// TestCheckHost: on this host, as root with the open-files limit of a
// systemd service, every check is ok and the exit status 0. (Where the hard
// limit cannot be raised, open-files is the one warning; still exit 0.)
func TestCheckHost(t *testing.T) {
	testutil.RequireFUSE(t)
	high := raiseOpenFiles(t)
	root := filepath.Join(t.TempDir(), "root")
	_, rep, code := runCheckCmd(t, testExe(t), root, os.Environ(), nil)
	wantStatus := hostcheck.StatusOK
	if !high {
		wantStatus = hostcheck.StatusWarn
	}
	if code != 0 || rep.Status != wantStatus {
		t.Fatalf("exit %d, status %s, want 0 and %s", code, rep.Status, wantStatus)
	}
	for _, f := range rep.Checks {
		if f.Status != hostcheck.StatusOK && f.Check != hostcheck.CheckOpenFiles {
			t.Errorf("check %s is %s: %s", f.Check, f.Status, f.Found)
		}
	}
	wantOpenFiles(t, rep, high)
	wantFinding(t, rep, hostcheck.CheckFuseOverlayfs, hostcheck.StatusOK, "version 1.")
	wantFinding(t, rep, hostcheck.CheckFuseDevice, hostcheck.StatusOK, "/dev/fuse mode 0")
	wantFinding(t, rep, hostcheck.CheckWhiteoutForms, hostcheck.StatusOK, "0/0 character devices", "trusted.overlay.opaque")
	wantFinding(t, rep, hostcheck.CheckKernelOverlayfs, hostcheck.StatusOK, "kernel overlayfs works here", "overlayfs snapshotter would be faster")
	for _, c := range []string{hostcheck.CheckMountHelper, hostcheck.CheckProbeMount} {
		finding(t, rep, c)
	}
	assertNoProbeLeft(t, root)
}

// assertNoProbeLeft: the checks leave no directory and no mount in the root.
func assertNoProbeLeft(t *testing.T, root string) {
	t.Helper()
	left, _ := filepath.Glob(filepath.Join(root, ".probe*"))
	if len(left) > 0 {
		t.Fatalf("check left %v", left)
	}
	mi, _ := os.ReadFile("/proc/self/mountinfo")
	if bytes.Contains(mi, []byte(root)) {
		t.Fatalf("check left a mount under %s", root)
	}
}

// TestCheckNoFuseOverlayfs: with fuse-overlayfs missing from PATH the
// check fails, says what to install, and the exit status is 1.
func TestCheckNoFuseOverlayfs(t *testing.T) {
	testutil.RequireFUSE(t)
	bin := t.TempDir()
	helper, err := exec.LookPath("mount.fuse3")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(helper, filepath.Join(bin, "mount.fuse3")); err != nil {
		t.Fatal(err)
	}
	env := append(withoutEnv(os.Environ(), "PATH"), "PATH="+bin)
	_, rep, code := runCheckCmd(t, testExe(t), filepath.Join(t.TempDir(), "root"), env, nil)
	if code != 1 || rep.Status != hostcheck.StatusFail {
		t.Fatalf("exit %d, status %s, want 1 and fail", code, rep.Status)
	}
	wantFinding(t, rep, hostcheck.CheckFuseOverlayfs, hostcheck.StatusFail, "fuse-overlayfs was not found on PATH ("+bin+")")
	if fix := finding(t, rep, hostcheck.CheckFuseOverlayfs).Fix; !strings.Contains(fix, "apt-get install fuse-overlayfs") {
		t.Fatalf("fix %q does not say what to install", fix)
	}
	wantFinding(t, rep, hostcheck.CheckMountHelper, hostcheck.StatusOK)
	wantFinding(t, rep, hostcheck.CheckProbeMount, hostcheck.StatusFail, "not tried: fuse-overlayfs failed")
}

func withoutEnv(env []string, name string) []string {
	var out []string
	for _, e := range env {
		if !strings.HasPrefix(e, name+"=") {
			out = append(out, e)
		}
	}
	return out
}

// TestCheckFuseDeviceNonRoot: with /dev/fuse at mode 0600 a non-root user
// (nobody) cannot open it: the check fails with the mode and the chmod;
// the user's subordinate IDs are reported. The mode is restored afterwards.
func TestCheckFuseDeviceNonRoot(t *testing.T) {
	testutil.RequireFUSE(t)
	st, err := os.Stat("/dev/fuse")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod("/dev/fuse", 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := os.Chmod("/dev/fuse", st.Mode().Perm()); err != nil {
			t.Errorf("restore the mode of /dev/fuse: %v", err)
		}
	})
	const nobody = 65534
	// The test binary and the root where nobody can reach them.
	dir := t.TempDir()
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	exe := filepath.Join(dir, "grpc")
	copyFile(t, testExe(t), exe)
	root := filepath.Join(dir, "root")
	if err := os.Mkdir(root, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(root, nobody, nobody); err != nil {
		t.Fatal(err)
	}
	env := append(withoutEnv(os.Environ(), "HOME"), "HOME="+dir)
	_, rep, code := runCheckCmd(t, exe, root, env, &syscall.Credential{Uid: nobody, Gid: nobody})
	if code != 1 || rep.Status != hostcheck.StatusFail || rep.UID != nobody {
		t.Fatalf("exit %d, status %s, uid %d: want 1, fail, %d", code, rep.Status, rep.UID, nobody)
	}
	wantFinding(t, rep, hostcheck.CheckFuseDevice, hostcheck.StatusFail, "mode 0600", "cannot open /dev/fuse read-write as uid 65534")
	if fix := finding(t, rep, hostcheck.CheckFuseDevice).Fix; !strings.Contains(fix, "chmod 0666 /dev/fuse") {
		t.Fatalf("fix %q", fix)
	}
	wantFinding(t, rep, hostcheck.CheckProbeMount, hostcheck.StatusFail, "not tried: fuse-device failed")
	wantFinding(t, rep, hostcheck.CheckSubordinateIDs, hostcheck.StatusWarn, "user nobody has 0 subordinate uids")
	finding(t, rep, hostcheck.CheckKernelOverlayfs)
}

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = in.Close() }()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestCheckRootOnKernelOverlay: with the root on a kernel overlay (containerd
// in a container) the checks pass; whiteouts are .wh. files there, and a
// kernel overlay cannot be stacked on it.
func TestCheckRootOnKernelOverlay(t *testing.T) {
	testutil.RequireFUSE(t)
	high := raiseOpenFiles(t)
	root := filepath.Join(testutil.KernelOverlay(t), "root")
	_, rep, code := runCheckCmd(t, testExe(t), root, os.Environ(), nil)
	if code != 0 || rep.Status == hostcheck.StatusFail {
		t.Fatalf("exit %d, status %s, want 0", code, rep.Status)
	}
	wantOpenFiles(t, rep, high)
	wantFinding(t, rep, hostcheck.CheckProbeMount, hostcheck.StatusOK)
	wantFinding(t, rep, hostcheck.CheckWhiteoutForms, hostcheck.StatusOK, ".wh.NAME files", "on overlay")
	wantFinding(t, rep, hostcheck.CheckKernelOverlayfs, hostcheck.StatusOK)
	assertNoProbeLeft(t, root)
}

// TestMetricsAddress: loopback addresses and unix sockets are accepted,
// anything reachable from elsewhere is refused as a usage error.
func TestMetricsAddress(t *testing.T) {
	for _, ok := range []string{"127.0.0.1:1338", "[::1]:1338", "localhost:1338", "127.0.0.2:9", "unix:/run/fo/metrics.sock"} {
		if err := checkMetricsAddress(ok); err != nil {
			t.Errorf("%s refused: %v", ok, err)
		}
	}
	for _, bad := range []string{"0.0.0.0:1338", ":1338", "10.0.0.1:1338", "[::]:1338", "example.com:80", "unix:rel.sock", "127.0.0.1", "127.0.0.1:"} {
		if err := checkMetricsAddress(bad); err == nil {
			t.Errorf("%s accepted", bad)
		}
	}
	var stderr bytes.Buffer
	if code := run([]string{"--metrics-address", "0.0.0.0:1338", "/tmp/s.sock", "/tmp/root"}, io.Discard, &stderr); code != exitUsage || !strings.Contains(stderr.String(), "only loopback") {
		t.Fatalf("exit %d, %s", code, stderr.String())
	}
}
