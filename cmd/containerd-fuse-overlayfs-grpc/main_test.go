package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/pelletier/go-toml/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	fuseoverlayfs "github.com/fosnap/fuseoverlayfs"
	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// runMainEnv makes the test binary behave as the command, so that the tests
// run the real program (signals, exit codes, sockets) without a separate
// build.
const runMainEnv = "FUSE_OVERLAYFS_GRPC_TEST_RUN_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(runMainEnv) == "1" {
		os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// server is the command started as a child process.
type server struct {
	t    testing.TB
	proc *testutil.Process
	out  *syncBuffer
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// start runs the command with args and extra environment variables.
func start(t testing.TB, env []string, args ...string) *server {
	t.Helper()
	s, err := startServer(env, args...)
	if err != nil {
		t.Fatal(err)
	}
	s.t = t
	t.Cleanup(func() {
		if s.kill() {
			t.Errorf("server (pid %d) was still running at the end of the test; killed it", s.proc.PID())
		}
	})
	return s
}

func startServer(env []string, args ...string) (*server, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	s := &server{out: &syncBuffer{}}
	cmd := exec.Command(self, args...)
	cmd.Env = append(append(os.Environ(), runMainEnv+"=1"), env...)
	cmd.Stdout = s.out
	cmd.Stderr = s.out
	if s.proc, err = testutil.StartProcess("server", cmd); err != nil {
		return nil, err
	}
	return s, nil
}

// kill ends a server still running, by its PID, and reports whether it had
// to.
func (s *server) kill() bool { return s.proc.Kill() }

// exitCode waits (up to 30 s) for the process and returns its exit code.
func (s *server) exitCode() int {
	s.t.Helper()
	code, err := s.wait()
	if err != nil {
		s.t.Fatal(err)
	}
	return code
}

func (s *server) wait() (int, error) {
	code, err := s.proc.Wait(30 * time.Second)
	if err != nil {
		return code, fmt.Errorf("%w; output:\n%s", err, s.out)
	}
	return code, nil
}

// runCommand runs the command to completion and returns its exit code and
// output.
func runCommand(t testing.TB, env []string, args ...string) (int, string) {
	t.Helper()
	s := start(t, env, args...)
	code := s.exitCode()
	return code, s.out.String()
}

// waitServing polls until the socket answers a gRPC call.
func (s *server) waitServing(socket string) snapshots.Snapshotter {
	s.t.Helper()
	sn, conn, err := s.serving(socket)
	if err != nil {
		s.t.Fatal(err)
	}
	s.t.Cleanup(func() { _ = conn.Close() })
	return sn
}

func (s *server) serving(socket string) (snapshots.Snapshotter, *grpc.ClientConn, error) {
	// Wait for the socket to accept connections first: a gRPC client that
	// finds no socket backs off for a second before its next try.
	if err := s.proc.WaitReady(30*time.Second, testutil.SocketReady(socket)); err != nil {
		return nil, nil, fmt.Errorf("nothing listens on %s: %w\n%s", socket, err, s.out)
	}
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, nil, err
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "fuse-overlayfs")
	ctx := namespaces.WithNamespace(context.Background(), "test")
	err = s.proc.WaitReady(30*time.Second, func() error {
		return sn.Walk(ctx, func(context.Context, snapshots.Info) error { return nil })
	})
	if err != nil {
		_ = conn.Close()
		return nil, nil, fmt.Errorf("server does not answer on %s: %w\n%s", socket, err, s.out)
	}
	return sn, conn, nil
}

// shortDir returns a fresh directory with a short path: a unix socket path
// must fit in 108 bytes, which t.TempDir() paths may not.
func shortDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "fog")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}

func TestParseArgs(t *testing.T) {
	for _, tc := range []struct {
		args         []string
		socket, root string
		config       string
		content      string
		version      bool
		err          string
	}{
		{args: []string{"/run/s.sock", "/var/lib/r"}, socket: "/run/s.sock", root: "/var/lib/r"},
		{args: []string{"--config", "c.toml", "/run/s.sock", "/var/lib/r"}, socket: "/run/s.sock", root: "/var/lib/r", config: "c.toml"},
		{args: []string{"/run/s.sock", "/var/lib/r", "--config=c.toml", "--log-level", "debug"}, socket: "/run/s.sock", root: "/var/lib/r", config: "c.toml"},
		{args: []string{"/run/s.sock", "--log-level=warn", "/var/lib/r"}, socket: "/run/s.sock", root: "/var/lib/r"},
		{args: []string{"--config", "c.toml", "/run/s.sock"}, socket: "/run/s.sock", config: "c.toml"},
		{args: []string{"/run/s.sock", "--content-dir", "/c", "/var/lib/r"}, socket: "/run/s.sock", root: "/var/lib/r", content: "/c"},
		{args: []string{"--version"}, version: true},
		{args: nil, err: "socket path is missing"},
		{args: []string{""}, err: "socket path is empty"},
		{args: []string{"a", "b", "c"}, err: "too many arguments"},
		{args: []string{"--bogus", "a", "b"}, err: "flag provided but not defined: -bogus"},
		{args: []string{"--log-level", "loud", "a", "b"}, err: `--log-level "loud"`},
		{args: []string{"a", "b", "--config"}, err: "flag needs an argument"},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			o, err := parseArgs(tc.args, io.Discard)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want one containing %q", err, tc.err)
				}
				var u usageError
				if !errors.As(err, &u) {
					t.Errorf("error %v is not a usage error", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if o.socket != tc.socket || o.root != tc.root || o.configPath != tc.config || o.contentDir != tc.content || o.version != tc.version {
				t.Errorf("got %+v, want socket %q root %q config %q content dir %q version %v", o, tc.socket, tc.root, tc.config, tc.content, tc.version)
			}
		})
	}
}

func TestLoadConfig(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name, toml string
		want       serverConfig
		err        string
	}{
		{name: "empty", toml: ""},
		{name: "all keys", toml: "root_path = '/var/lib/fo'\nsync_remove = true\nmount_options = ['noacl', 'squash_to_uid=5']\ncontent_dir = '/var/lib/containerd/io.containerd.content.v1.content'\n",
			want: serverConfig{Config: fuseoverlayfs.Config{RootPath: "/var/lib/fo", SyncRemove: true, MountOptions: []string{"noacl", "squash_to_uid=5"}}, ContentDir: "/var/lib/containerd/io.containerd.content.v1.content"}},
		{name: "socket is no key", toml: "socket = '/run/x.sock'\n", err: "unknown key(s) socket"},
		{name: "relative content dir", toml: "content_dir = 'containerd/io.containerd.content.v1.content'\n", err: "content_dir"},
		{name: "unknown key", toml: "root_path = '/x'\nsync_removal = true\n", err: "unknown key(s) sync_removal (known: root_path, sync_remove, mount_options, content_dir)"},
		{name: "plugin section", toml: "[plugins.'io.containerd.snapshotter.v1.fuse-overlayfs']\nsync_remove = true\n", err: "unknown key(s) plugins"},
		{name: "wrong type", toml: "sync_remove = 'yes'\n", err: "key sync_remove"},
		{name: "list wanted", toml: "mount_options = 'noacl'\n", err: "key mount_options"},
		{name: "bad option", toml: "mount_options = ['noacl,upperdir=/etc']\n", err: `mount option "noacl,upperdir=/etc"`},
		{name: "reserved option", toml: "mount_options = ['lowerdir=/']\n", err: "lowerdir is set by the snapshotter"},
		{name: "not toml", toml: "sync_remove = \n", err: "line 1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "_")+".toml")
			if err := os.WriteFile(path, []byte(tc.toml), 0o600); err != nil {
				t.Fatal(err)
			}
			cfg, err := loadConfig(path)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) || !strings.Contains(err.Error(), path) {
					t.Fatalf("error %v, want one naming %s and containing %q", err, path, tc.err)
				}
				if !errdefs.IsInvalidArgument(err) {
					t.Errorf("error %v is not invalid argument", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(cfg) != fmt.Sprint(tc.want) {
				t.Errorf("got %+v, want %+v", cfg, tc.want)
			}
		})
	}
	if _, err := loadConfig(filepath.Join(dir, "missing.toml")); err == nil || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: error %v, want not-exist", err)
	}
	// The decoder's errors stay the causes of the messages built on them.
	var strict *toml.StrictMissingError
	if _, err := loadConfig(filepath.Join(dir, "unknown_key.toml")); !errors.As(err, &strict) {
		t.Errorf("unknown key: error %v does not wrap *toml.StrictMissingError", err)
	}
	var decErr *toml.DecodeError
	if _, err := loadConfig(filepath.Join(dir, "not_toml.toml")); !errors.As(err, &decErr) {
		t.Errorf("not toml: error %v does not wrap *toml.DecodeError", err)
	}
}

func TestResolveRoot(t *testing.T) {
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "c.toml")
	if err := os.WriteFile(cfgPath, []byte("root_path = '/from/config'\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name       string
		o          options
		root, err  string
		socketAbs  bool
		wantConfig bool
	}{
		{name: "argument", o: options{socket: "s.sock", root: "/r"}, root: "/r"},
		{name: "relative root made absolute", o: options{socket: "/s.sock", root: "rel"}, root: filepath.Join(mustGetwd(t), "rel")},
		{name: "from config", o: options{socket: "/s.sock", configPath: cfgPath}, root: "/from/config"},
		{name: "same in both", o: options{socket: "/s.sock", root: "/from/config/", configPath: cfgPath}, root: "/from/config"},
		{name: "differ", o: options{socket: "/s.sock", root: "/other", configPath: cfgPath}, err: "differ"},
		{name: "none", o: options{socket: "/s.sock"}, err: "root is missing"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := tc.o
			cfg, err := resolve(o)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want one containing %q", err, tc.err)
				}
				if !errdefs.IsInvalidArgument(err) {
					t.Errorf("error %v is not invalid argument", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if cfg.RootPath != tc.root {
				t.Errorf("root %q, want %q", cfg.RootPath, tc.root)
			}
			if !filepath.IsAbs(cfg.Socket) {
				t.Errorf("socket %q is not absolute", cfg.Socket)
			}
		})
	}
}

func mustGetwd(t *testing.T) string {
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	return wd
}

func TestVersion(t *testing.T) {
	code, out := runCommand(t, nil, "--version")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, out)
	}
	for _, want := range []string{name + " ", "containerd v2.4.2", "go1."} {
		if !strings.Contains(out, want) {
			t.Errorf("--version output %q lacks %q", out, want)
		}
	}
}

func TestBadCommandLine(t *testing.T) {
	dir := shortDir(t)
	bad := filepath.Join(dir, "bad.toml")
	if err := os.WriteFile(bad, []byte("sync_remove = true\nmount_option = ['noacl']\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	socket := filepath.Join(dir, "run", "s.sock")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{nil, "the socket path is missing"},
		{[]string{"--nope", socket, dir}, "flag provided but not defined: -nope"},
		{[]string{"--config", bad, socket, filepath.Join(dir, "root")}, "unknown key(s) mount_option"},
		{[]string{"--config", filepath.Join(dir, "none.toml"), socket, filepath.Join(dir, "root")}, "no such file"},
		{[]string{socket}, "the snapshotter root is missing"},
	} {
		code, out := runCommand(t, nil, tc.args...)
		if code != exitUsage || !strings.Contains(out, tc.want) {
			t.Errorf("%q: exit %d, output %q; want exit %d and %q", tc.args, code, out, exitUsage, tc.want)
		}
	}
	// Nothing was created for a refused command line.
	for _, p := range []string{socket, filepath.Dir(socket), filepath.Join(dir, "root")} {
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s exists after a refused start (%v)", p, err)
		}
	}
}

// TestHostCheckMessage: without fuse-overlayfs on PATH the server exits
// non-zero with the message the built-in plugin gives.
func TestHostCheckMessage(t *testing.T) {
	dir := shortDir(t)
	emptyPath := filepath.Join(dir, "emptybin")
	if err := os.Mkdir(emptyPath, 0o755); err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(dir, "root")
	t.Setenv("PATH", emptyPath)
	want := fuseoverlayfs.Supported(root)
	if want == nil {
		t.Fatal("host check passed with an empty PATH")
	}
	code, out := runCommand(t, nil, filepath.Join(dir, "run", "s.sock"), root)
	if code != exitFailure {
		t.Errorf("exit %d, want %d; output:\n%s", code, exitFailure, out)
	}
	if !strings.Contains(out, want.Error()) {
		t.Errorf("output %q does not hold the host check's message %q", out, want)
	}
	if _, err := os.Lstat(filepath.Join(dir, "run", "s.sock")); err == nil {
		t.Error("socket created although the host check failed")
	}
}

// notifySocket is a fake systemd notification socket.
type notifySocket struct{ *testutil.NotifySocket }

func newNotifySocket(t *testing.T, dir string) *notifySocket {
	t.Helper()
	n, err := testutil.NewNotifySocket(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = n.Close() })
	return &notifySocket{n}
}

// expect waits (up to 30 s) for a datagram and checks its content.
func (n *notifySocket) expect(t *testing.T, want string) {
	t.Helper()
	if err := n.Expect(want, 30*time.Second); err != nil {
		t.Fatal(err)
	}
}

// TestServe drives the server through containerd's proxy client: sockets
// and modes, readiness notification, layers over real fuse-overlayfs
// mounts, SIGTERM and SIGINT exiting 0, and snapshots surviving a restart.
func TestServe(t *testing.T) {
	testutil.RequireFUSE(t)
	dir := shortDir(t)
	root := filepath.Join(dir, "root")
	socket := filepath.Join(dir, "run", "fo.sock")
	notify := newNotifySocket(t, dir)
	cfg := filepath.Join(dir, "c.toml")
	if err := os.WriteFile(cfg, []byte("sync_remove = true\nmount_options = ['noacl']\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	env := []string{"NOTIFY_SOCKET=" + notify.Path}

	srv := start(t, env, socket, root, "--config", cfg, "--log-level", "debug")
	notify.expect(t, "READY=1")
	// READY=1 comes after listen: the socket must exist now.
	for path, want := range map[string]os.FileMode{socket: os.ModeSocket | 0o600, filepath.Dir(socket): os.ModeDir | 0o700, root: os.ModeDir | 0o700} {
		st, err := os.Lstat(path)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode() != want {
			t.Errorf("%s has mode %v, want %v", path, st.Mode(), want)
		}
	}
	sn := srv.waitServing(socket)
	ctx := namespaces.WithNamespace(context.Background(), "test")

	// A base layer, written through its mount.
	mounts, err := sn.Prepare(ctx, "base-active", "")
	if err != nil {
		t.Fatal(err)
	}
	withMount(t, mounts, func(mp string) {
		if err := os.WriteFile(filepath.Join(mp, "base.txt"), []byte("base"), 0o644); err != nil {
			t.Fatal(err)
		}
	})
	if err := sn.Commit(ctx, "base", "base-active"); err != nil {
		t.Fatal(err)
	}
	// A child over it: a real fuse-overlayfs mount with the configured option.
	mounts, err = sn.Prepare(ctx, "child", "base", snapshots.WithLabels(map[string]string{"test": "label"}))
	if err != nil {
		t.Fatal(err)
	}
	if len(mounts) != 1 || mounts[0].Type != fuseoverlayfs.MountType || !contains(mounts[0].Options, "noacl") {
		t.Fatalf("child mounts %+v, want one %s mount with noacl", mounts, fuseoverlayfs.MountType)
	}
	withMount(t, mounts, func(mp string) {
		got, err := os.ReadFile(filepath.Join(mp, "base.txt"))
		if err != nil || string(got) != "base" {
			t.Fatalf("base.txt through the overlay: %q, %v", got, err)
		}
		if err := os.WriteFile(filepath.Join(mp, "child.txt"), []byte("child"), 0o644); err != nil {
			t.Fatal(err)
		}
	})

	// SIGTERM: stops serving, exits 0, removes the socket, says STOPPING.
	if err := srv.proc.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := srv.exitCode(); code != 0 {
		t.Fatalf("exit %d after SIGTERM, want 0; output:\n%s", code, srv.out)
	}
	notify.expect(t, "STOPPING=1")
	if _, err := os.Lstat(socket); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket still there after exit: %v", err)
	}
	if !strings.Contains(srv.out.String(), "stopping") {
		t.Errorf("no stop message in the log:\n%s", srv.out)
	}

	// Restarted on the same root: everything is still there.
	srv = start(t, env, "--config", cfg, socket, root)
	notify.expect(t, "READY=1")
	sn = srv.waitServing(socket)
	info, err := sn.Stat(ctx, "child")
	if err != nil {
		t.Fatal(err)
	}
	if info.Kind != snapshots.KindActive || info.Parent != "base" || info.Labels["test"] != "label" {
		t.Errorf("child after restart: %+v", info)
	}
	mounts, err = sn.Mounts(ctx, "child")
	if err != nil {
		t.Fatal(err)
	}
	withMount(t, mounts, func(mp string) {
		for f, want := range map[string]string{"base.txt": "base", "child.txt": "child"} {
			got, err := os.ReadFile(filepath.Join(mp, f))
			if err != nil || string(got) != want {
				t.Errorf("%s after restart: %q, %v", f, got, err)
			}
		}
	})
	usage, err := sn.Usage(ctx, "child")
	if err != nil || usage.Inodes < 1 {
		t.Errorf("usage of child: %+v, %v", usage, err)
	}
	for _, key := range []string{"child", "base"} {
		if err := sn.Remove(ctx, key); err != nil {
			t.Fatal(err)
		}
	}
	// sync_remove = true from the config file: the directories are gone.
	entries, err := os.ReadDir(filepath.Join(root, "snapshots"))
	if err != nil || len(entries) != 0 {
		t.Errorf("snapshots/ after removing everything: %v, %v", entries, err)
	}
	if err := srv.proc.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	if code := srv.exitCode(); code != 0 {
		t.Fatalf("exit %d after SIGINT, want 0; output:\n%s", code, srv.out)
	}
	notify.expect(t, "STOPPING=1")
	testutil.RequireNoLeftovers(t, root)
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// withMount mounts mounts on a temporary directory, calls fn and unmounts.
func withMount(t *testing.T, mounts []mount.Mount, fn func(mp string)) {
	t.Helper()
	mp := t.TempDir()
	if err := mount.All(mounts, mp); err != nil {
		t.Fatalf("mount %+v: %v", mounts, err)
	}
	defer func() {
		if err := mount.UnmountAll(mp, 0); err != nil {
			t.Errorf("unmount %s: %v", mp, err)
		}
	}()
	fn(mp)
}

// TestSnapshotterSuiteOverGRPC runs containerd's snapshotter suite against
// the server through containerd's proxy client, one server per subtest.
func TestSnapshotterSuiteOverGRPC(t *testing.T) {
	testutil.RequireFUSE(t)
	dir := shortDir(t)
	// The suite makes its directories in TMPDIR: a private one tells its
	// mounts from those of a suite running in parallel in another package.
	tmp := filepath.Join(dir, "tmp")
	if err := os.Mkdir(tmp, 0o700); err != nil {
		t.Fatal(err)
	}
	t.Setenv("TMPDIR", tmp)
	var mu sync.Mutex
	n := 0
	// The name selects the suite's expectations for fuse-overlayfs.
	testsuite.SnapshotterSuite(t, "fuse-overlayfs", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		mu.Lock()
		n++
		socket := filepath.Join(dir, "s", fmt.Sprint(n), "s.sock")
		mu.Unlock()
		srv, err := startServer(nil, socket, root)
		if err != nil {
			return nil, nil, err
		}
		sn, conn, err := srv.serving(socket)
		if err != nil {
			srv.kill()
			return nil, nil, err
		}
		return sn, func() error {
			_ = conn.Close()
			if err := srv.proc.Signal(syscall.SIGTERM); err != nil {
				return err
			}
			code, err := srv.wait()
			if err != nil {
				return err
			}
			if code != 0 {
				return fmt.Errorf("server exited %d after SIGTERM:\n%s", code, srv.out)
			}
			return nil
		}, nil
	})
	testutil.RequireNoLeftovers(t, tmp)
}
