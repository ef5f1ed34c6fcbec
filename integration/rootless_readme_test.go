package integration

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fosnap/fuseoverlayfs/integration/internal/harness"
	"github.com/fosnap/fuseoverlayfs/integration/internal/images"
	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// rootlessDoc is the document the rootless tests run as written.
const rootlessDoc = "docs/rootless.md"

// readmeBlock returns the n-th (0-based) code block of language lang in the
// "## heading" section of doc (the text of rootlessDoc).
func readmeBlock(t *testing.T, doc, heading, lang string, n int) string {
	t.Helper()
	_, rest, ok := strings.Cut(doc, "\n"+heading+"\n")
	if !ok {
		t.Fatalf("%s has no heading %q", rootlessDoc, heading)
	}
	if end := strings.Index(rest, "\n## "); end >= 0 {
		rest = rest[:end]
	}
	for i := 0; ; i++ {
		_, after, ok := strings.Cut(rest, "```"+lang+"\n")
		if !ok {
			t.Fatalf("%s: no %s block number %d under %q", rootlessDoc, lang, n+1, heading)
		}
		block, tail, ok := strings.Cut(after, "```")
		if !ok {
			t.Fatalf("%s: unterminated %s block under %q", rootlessDoc, lang, heading)
		}
		if i == n {
			return block
		}
		rest = tail
	}
}

// replaceOnce replaces old, which must occur exactly once, by new.
func replaceOnce(t *testing.T, s, old, new string) string {
	t.Helper()
	return replaceN(t, s, old, new, 1)
}

// replaceN replaces old, which must occur exactly n times, by new.
func replaceN(t *testing.T, s, old, new string, n int) string {
	t.Helper()
	if c := strings.Count(s, old); c != n {
		t.Fatalf("README.md changed: %q occurs %d times (want %d) in\n%s", old, c, n, s)
	}
	return strings.ReplaceAll(s, old, new)
}

// TestRootlessReadme runs docs/rootless.md as written, as the
// unprivileged user: its RootlessKit command starts our containerd with
// config/containerd.toml, its client commands run a container on
// fuse-overlayfs; then the same RootlessKit command starts containerd-stock
// with config/containerd-proxy.toml and the systemd unit's ExecStart joins
// its namespaces to serve the snapshotter. The only changes: the image is
// imported from an archive instead of pulled from Docker Hub (no internet),
// it runs /bin/probe instead of busybox's echo, and the unit's %t and %h
// are expanded as systemd would.
func TestRootlessReadme(t *testing.T) {
	r := newRootlessRun(t, []string{"containerd-stock", "containerd-fuse-overlayfs-grpc"}, true)
	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(root, rootlessDoc))
	if err != nil {
		t.Fatal(err)
	}
	readme := string(data)
	const builtinHeading = "## containerd with the built-in plugin, under RootlessKit"
	start := readmeBlock(t, readme, builtinHeading, "sh", 0)
	client := readmeBlock(t, readme, builtinHeading, "sh", 1)
	unit := readmeBlock(t, readme, "## An unmodified containerd with the proxy plugin", "ini", 0)

	// The README's host prerequisite for --net=slirp4netns.
	if st, err := os.Stat("/dev/net/tun"); err != nil {
		testutil.Unavailable(t, "/dev/net/tun: %v", err)
	} else if st.Mode().Perm() != 0o666 {
		if err := os.Chmod("/dev/net/tun", 0o666); err != nil {
			t.Fatal(err)
		}
	}

	home := filepath.Join(r.stage, "home")
	runtimeDir := filepath.Join(r.stage, "run")
	archive := filepath.Join(r.stage, "features.tar")
	const ref = "example.test/readme/features:1"
	if err := images.WriteOCIArchive(archive, ref, getFixture(t).features); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(archive, 0o644); err != nil {
		t.Fatal(err)
	}
	client = replaceOnce(t, client, "ctr images pull --snapshotter fuse-overlayfs docker.io/library/busybox:latest",
		"ctr images import --snapshotter fuse-overlayfs "+archive)
	client = replaceOnce(t, client, "docker.io/library/busybox:latest hello echo hi", ref+" hello "+images.ProbePath+" echo hi")
	// The client block's first two lines: the rl() function and the
	// containerd address.
	lines := strings.SplitN(client, "\n", 3)
	if len(lines) < 3 || !strings.HasPrefix(lines[0], "rl() {") || !strings.HasPrefix(lines[1], "export CONTAINERD_ADDRESS=") {
		t.Fatalf("README.md changed: the client block does not start with rl() and CONTAINERD_ADDRESS:\n%s", client)
	}
	rl := lines[0] + "\n" + lines[1]
	env := append([]string{"HOME=" + home, "XDG_RUNTIME_DIR=" + runtimeDir}, harness.EnvWithout(r.env, "HOME", "XDG_RUNTIME_DIR", innerEnv)...)

	cfgDir := filepath.Join(home, ".config", "containerd")
	writeUserFile := func(path string, data []byte) {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := chownTree(home, r.user.UID, r.user.GID); err != nil {
			t.Fatal(err)
		}
	}

	t.Run("builtin", func(t *testing.T) {
		cfg, err := os.ReadFile(filepath.Join(root, "config", "containerd.toml"))
		if err != nil {
			t.Fatal(err)
		}
		writeUserFile(filepath.Join(cfgDir, "config.toml"), cfg)
		d := startReadmeContainerd(t, r, env, start)
		out := d.user(t, client)
		if !strings.Contains(out, "\nhi\n") && !strings.HasPrefix(out, "hi\n") {
			t.Fatalf("the README's client commands did not print hi:\n%s", out)
		}
		assertContains(t, "snapshots", d.user(t, rl+"\nrl ctr snapshots --snapshotter fuse-overlayfs ls"), "Committed")
		d.stop(t)
	})

	t.Run("proxy", func(t *testing.T) {
		// A fresh containerd root: the one above knows snapshots the
		// proxy's root does not hold.
		if err := os.RemoveAll(filepath.Join(home, ".local", "share", "containerd")); err != nil {
			t.Fatal(err)
		}
		proxyCfg, err := os.ReadFile(filepath.Join(root, "config", harness.ProxyConfigFile))
		if err != nil {
			t.Fatal(err)
		}
		// The unit's socket and root, as systemd expands %t and %h.
		socket := filepath.Join(runtimeDir, "containerd-fuse-overlayfs", "grpc.sock")
		serverRoot := filepath.Join(home, ".local", "share", "containerd-fuse-overlayfs")
		cfgText := replaceN(t, string(proxyCfg), "/run/user/1000/containerd-fuse-overlayfs/grpc.sock", socket, 2)
		cfgText = replaceOnce(t, cfgText, "/home/user/.local/share/containerd-fuse-overlayfs", serverRoot)
		writeUserFile(filepath.Join(cfgDir, "config.toml"), []byte(cfgText))
		d := startReadmeContainerd(t, r, env, replaceOnce(t, start, "exec containerd ", "exec containerd-stock "))

		var execStart string
		for _, line := range strings.Split(unit, "\n") {
			if v, ok := strings.CutPrefix(line, "ExecStart="); ok {
				execStart = strings.NewReplacer("%t", runtimeDir, "%h", home).Replace(v)
			}
		}
		if execStart == "" {
			t.Fatal("README.md's unit has no ExecStart")
		}
		notify, err := testutil.NewNotifySocket(runtimeDir)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = notify.Close() }()
		if err := os.Chmod(notify.Path, 0o666); err != nil {
			t.Fatal(err)
		}
		var proxyOut harness.Output
		proxy, err := r.user.StartShell("the unit's server", append(env, notify.Env()), &proxyOut, "exec "+execStart)
		if err != nil {
			t.Fatal(err)
		}
		defer func() {
			if err := proxy.KillLeftover(false); err != nil {
				t.Errorf("%v:\n%s", err, &proxyOut)
			}
		}()
		if err := notify.Expect("READY=1", 30*time.Second); err != nil {
			t.Fatalf("the unit's ExecStart did not report READY=1: %v\n%s", err, &proxyOut)
		}

		out := d.user(t, client)
		if !strings.Contains(out, "\nhi\n") && !strings.HasPrefix(out, "hi\n") {
			t.Fatalf("the README's client commands did not print hi:\n%s", out)
		}
		// The layers are in the server's root, as the unit names it, and
		// the server wrote them itself, reading them from containerd's
		// content store where the README puts it (its default).
		entries, err := os.ReadDir(filepath.Join(serverRoot, "snapshots"))
		if err != nil || len(entries) < len(getFixture(t).features.Layers) {
			t.Fatalf("the server's root holds %d snapshots (%v), want the image's layers", len(entries), err)
		}
		if n := strings.Count(proxyOut.String(), `level=info msg="layer applied directly"`); n < len(getFixture(t).features.Layers)/2 {
			t.Errorf("the server applied %d layers directly, want most of the image's %d:\n%s", n, len(getFixture(t).features.Layers), &proxyOut)
		}
		// What the server wrote is what containerd's native snapshotter
		// makes of the same archive.
		trees := map[string][]string{}
		for _, s := range []string{"native", sn} {
			if s == "native" {
				d.user(t, rl+"\nrl ctr images import --snapshotter native "+archive)
			}
			trees[s] = treeLines(d.user(t, rl+"\nrl ctr run --rm --snapshotter "+s+` --cgroup "" --cpu-shares 0 `+ref+" tree-"+s+" "+images.ProbePath+" treedump /"))
		}
		if diff := diffLines(trees["native"], trees[sn]); diff != "" {
			t.Fatalf("tree on fuse-overlayfs through the proxy differs from native (- native, + fuse-overlayfs):\n%s", diff)
		}
		checkTree(t, getFixture(t).features, trees[sn])

		// systemd stops the unit with SIGTERM: the server is the unit's
		// main process (sh and nsenter exec it).
		if cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", proxy.PID())); err != nil ||
			!strings.HasPrefix(string(cmdline), "containerd-fuse-overlayfs-grpc\x00") {
			t.Errorf("the unit's main process is not the server: %q, %v", cmdline, err)
		}
		if !proxy.Running() {
			t.Fatalf("the unit's server exited before its SIGTERM: %v\n%s", proxy.Err(), &proxyOut)
		}
		if err := proxy.Terminate(30 * time.Second); errors.Is(err, testutil.ErrStillRunning) {
			t.Fatalf("the unit's server ignored SIGTERM:\n%s", &proxyOut)
		} else if err != nil {
			t.Errorf("the unit's server after SIGTERM: %v, want exit status 0:\n%s", err, &proxyOut)
		}
		d.stop(t)
	})
}

// readmeContainerd is the README's RootlessKit command, running.
type readmeContainerd struct {
	r    *rootlessRun
	env  []string
	proc *testutil.Process // RootlessKit
	out  *harness.Output
	// children are RootlessKit's child processes (its namespaces' init,
	// slirp4netns) by PID, with their command lines: slirp4netns' does
	// not name the test's directory, so the leftover check cannot see it.
	children map[int]string
}

// startReadmeContainerd runs the README's start command as the user and
// waits for containerd's socket.
func startReadmeContainerd(t *testing.T, r *rootlessRun, env []string, script string) *readmeContainerd {
	t.Helper()
	d := &readmeContainerd{r: r, env: env, out: &harness.Output{}, children: map[int]string{}}
	// exec: RootlessKit itself is the process to stop; it passes SIGTERM
	// on to containerd.
	var err error
	if d.proc, err = r.user.StartShell("RootlessKit", env, d.out, "exec "+script); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.killLeftover(t) })
	socket := filepath.Join(envValue(env, "XDG_RUNTIME_DIR"), "containerd", "containerd.sock")
	if err := d.proc.WaitReady(60*time.Second, testutil.SocketReady(socket)); err != nil {
		t.Fatalf("the README's RootlessKit command did not bring containerd up: %v\n%s", err, d.out)
	}
	pid := d.proc.PID()
	d.children = childrenOf(pid)
	var names []string
	for child, cmdline := range d.children {
		names = append(names, fmt.Sprintf("%d %.40s", child, strings.ReplaceAll(cmdline, "\x00", " ")))
	}
	t.Logf("RootlessKit pid %d, children: %s", pid, strings.Join(names, "; "))
	return d
}

// killLeftover ends, by PID, a RootlessKit that a failed test did not stop,
// and its children.
func (d *readmeContainerd) killLeftover(t *testing.T) {
	if !d.proc.Running() {
		return
	}
	// The test may have failed before its children were known.
	for pid, cmdline := range childrenOf(d.proc.PID()) {
		d.children[pid] = cmdline
	}
	if err := d.proc.KillLeftover(false); err != nil {
		t.Errorf("%v:\n%s", err, d.out)
	}
	d.reapChildren(t)
}

// childrenOf returns the child processes of pid with their command lines.
func childrenOf(pid int) map[int]string {
	children := map[int]string{}
	// A Go program forks from any of its threads: ask each.
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	for _, task := range tasks {
		kids, err := os.ReadFile(task)
		if err != nil {
			continue // the thread ended
		}
		for _, f := range strings.Fields(string(kids)) {
			var child int
			if _, err := fmt.Sscan(f, &child); err == nil {
				children[child] = cmdlineOf(child)
			}
		}
	}
	return children
}

func cmdlineOf(pid int) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return string(b)
}

// user runs a script as the user and returns its output; it fails the test
// on a non-zero exit.
func (d *readmeContainerd) user(t *testing.T, script string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := d.r.user.Shell(ctx, d.env, script)
	// At the deadline end the whole script (Shell gives it its own process
	// group), not only sh: a hung nsenter or ctr would outlive the test.
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("as %s: %s\n%v\n%s\ncontainerd:\n%s", d.r.user.Name, script, err, out, d.out)
	}
	t.Logf("as %s:\n%s\n%s", d.r.user.Name, indent(script), indent(string(out)))
	return string(out)
}

// stop sends SIGTERM to RootlessKit and waits for it and containerd.
func (d *readmeContainerd) stop(t *testing.T) {
	t.Helper()
	if !d.proc.Running() {
		t.Fatalf("RootlessKit exited before its stop: %v\n%s", d.proc.Err(), d.out)
	}
	// containerd's exit status on SIGTERM does not matter here.
	if err := d.proc.Terminate(60 * time.Second); errors.Is(err, testutil.ErrStillRunning) {
		t.Fatalf("RootlessKit and containerd still run 60s after SIGTERM:\n%s", d.out)
	}
	d.reapChildren(t)
}

// reapChildren waits, with a deadline, for RootlessKit's children to end
// after RootlessKit did; it fails the test for, and kills by PID, any that
// outlived it.
func (d *readmeContainerd) reapChildren(t *testing.T) {
	t.Helper()
	err := harness.Poll(15*time.Second, 100*time.Millisecond, func() error {
		for pid, cmdline := range d.children {
			if cmdline != "" && cmdlineOf(pid) == cmdline {
				return fmt.Errorf("process %d (%s) outlived RootlessKit", pid, strings.ReplaceAll(cmdline, "\x00", " "))
			}
		}
		return nil
	})
	if err != nil {
		t.Error(err)
		for pid, cmdline := range d.children {
			if cmdline != "" && cmdlineOf(pid) == cmdline {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
}
