//go:build linux

package hostcheck

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fosnap/fuseoverlayfs/internal/layout"
	"golang.org/x/sys/unix"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// checkChildEnv makes the test binary run Check under the open-files limit
// it names ("soft:hard:root") and exit: lowering a hard limit cannot be
// undone without CAP_SYS_RESOURCE, so it is done in a child process.
const checkChildEnv = "FOSNAP_TEST_CHECK_NOFILE"

func TestMain(m *testing.M) {
	if spec := os.Getenv(checkChildEnv); spec != "" {
		os.Exit(checkChild(spec))
	}
	os.Exit(m.Run())
}

// checkChild sets RLIMIT_NOFILE, runs Require (its log goes to stderr) and
// prints the open-files limit it found on stdout.
func checkChild(spec string) int {
	var soft, hard uint64
	var root string
	if _, err := fmt.Sscanf(spec, "%d:%d:%s", &soft, &hard, &root); err != nil {
		fmt.Fprintln(os.Stderr, "bad", checkChildEnv, spec, err)
		return 2
	}
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &unix.Rlimit{Cur: soft, Max: hard}); err != nil {
		fmt.Fprintln(os.Stderr, "setrlimit:", err)
		return 2
	}
	info, err := Require(root)
	if err != nil {
		fmt.Fprintln(os.Stderr, "check:", err)
		return 1
	}
	fmt.Printf("open-files %d\n", info.OpenFiles)
	return 0
}

// TestOpenFilesWarning runs the host check in a child with lowered
// open-files limits, which the probe's fuse-overlayfs server inherits. With
// a hard limit under the threshold Require reports it and logs the warning
// with how to raise it. With a low soft limit only, it reports the hard
// limit (fuse-overlayfs raises its soft limit to it) and warns only if that
// is low.
func TestOpenFilesWarning(t *testing.T) {
	testutil.RequireFUSE(t)
	var cur unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &cur); err != nil {
		t.Fatal(err)
	}
	if cur.Max < 4096 {
		t.Fatalf("this process's hard open-files limit %d is too low to stage the test", cur.Max)
	}

	got, logs := checkWithLimit(t, 1024, 2048)
	if got != 2048 {
		t.Errorf("hard limit 2048: Require reports %d open files", got)
	}
	for _, want := range []string{"at most 2048 open files", "recommended " + strconv.Itoa(minOpenFiles), "EMFILE", "LimitNOFILE=", "ulimit -n", "level=warning"} {
		if !strings.Contains(logs, want) {
			t.Errorf("warning lacks %q; log:\n%s", want, logs)
		}
	}

	got, logs = checkWithLimit(t, 1024, cur.Max)
	if got != cur.Max {
		t.Errorf("soft 1024, hard %d: Require reports %d open files", cur.Max, got)
	}
	if warned := strings.Contains(logs, "open files (RLIMIT_NOFILE"); warned != (cur.Max < minOpenFiles) {
		t.Errorf("hard limit %d, threshold %d: warned %v; log:\n%s", cur.Max, minOpenFiles, warned, logs)
	}
}

// checkWithLimit runs Check in a child under the given limits and returns
// the open-files limit it reported and its log.
func checkWithLimit(t *testing.T, soft, hard uint64) (uint64, string) {
	t.Helper()
	root := filepath.Join(t.TempDir(), "root")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%d:%d:%s", checkChildEnv, soft, hard, root))
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("check with RLIMIT_NOFILE %d:%d: %v\n%s", soft, hard, err, stderr.String())
	}
	testutil.RequireNoLeftovers(t, root)
	var n uint64
	if _, err := fmt.Sscanf(string(out), "open-files %d", &n); err != nil {
		t.Fatalf("child printed %q: %v", out, err)
	}
	return n, stderr.String()
}

func TestSoftOpenFiles(t *testing.T) {
	dir := t.TempDir()
	for content, want := range map[string]uint64{
		"Limit                     Soft Limit           Hard Limit           Units\nMax open files            4096                 8192                 files\n": 4096,
		"Max open files            unlimited            unlimited            files\n":                                                                            unix.RLIM_INFINITY,
	} {
		path := filepath.Join(dir, "limits")
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		if got, err := softOpenFiles(path); err != nil || got != want {
			t.Errorf("%q: got %d, %v; want %d", content, got, err, want)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "limits"), []byte("Max processes 10 10 processes\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := softOpenFiles(filepath.Join(dir, "limits")); err == nil {
		t.Error("a limits file without open files was read")
	}
}

// TestFuseServerLimit finds a running fuse-overlayfs server by its mount
// point and reads its limit: the hard limit of this process, to which the
// server raised its soft limit.
func TestFuseServerLimit(t *testing.T) {
	testutil.RequireFUSE(t)
	dir := t.TempDir()
	lower, target := filepath.Join(dir, "l"), filepath.Join(dir, "m")
	for _, d := range []string{lower, target} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	m := layout.Overlay([]string{lower}, "", "")
	if err := m.Mount(target); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := unmount(target); err != nil {
			t.Error(err)
		}
		testutil.RequireNoLeftovers(t, dir)
	})
	var cur unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &cur); err != nil {
		t.Fatal(err)
	}
	n, ok := fuseServerLimit(target)
	if !ok || n != cur.Max {
		t.Errorf("server limit %d (found %v), want the hard limit %d", n, ok, cur.Max)
	}
	if _, ok := fuseServerLimit(filepath.Join(dir, "nothing-mounted")); ok {
		t.Error("found a server for a path nothing is mounted on")
	}
}
