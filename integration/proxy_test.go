package integration

// The snapshotter and its differ served by containerd-fuse-overlayfs-grpc
// to an unmodified containerd (bin/containerd-stock) through proxy plugins,
// configured by config/containerd-proxy.toml.

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/fosnap/fuseoverlayfs/integration/internal/harness"
	"github.com/fosnap/fuseoverlayfs/integration/internal/images"
)

// proxyServer is containerd-fuse-overlayfs-grpc started by a test.
type proxyServer struct {
	*harness.ProxyServer
	t *testing.T
}

// startProxy starts bin/containerd-fuse-overlayfs-grpc and waits for its
// READY=1; at the end of the test it must have been stopped.
func startProxy(t *testing.T, socket, root, contentDir, logPath string) *proxyServer {
	t.Helper()
	p := &proxyServer{t: t}
	p.start(socket, root, contentDir, logPath)
	t.Cleanup(func() {
		if p.Kill() {
			t.Errorf("containerd-fuse-overlayfs-grpc (pid %d) still ran at the end of the test; killed it", p.PID())
		}
		if t.Failed() {
			log, _ := os.ReadFile(p.LogPath)
			t.Logf("containerd-fuse-overlayfs-grpc log:\n%s", log)
		}
	})
	return p
}

func (p *proxyServer) start(socket, root, contentDir, logPath string) {
	p.t.Helper()
	s, err := harness.StartProxyServer(socket, root, contentDir, logPath)
	if err != nil {
		p.t.Fatal(err)
	}
	p.ProxyServer = s
}

// restart starts the server again with the same arguments.
func (p *proxyServer) restart() {
	p.t.Helper()
	p.start(p.Socket, p.Root, p.ContentDir, p.LogPath)
}

// stop sends SIGTERM and expects exit status 0 and the socket gone.
func (p *proxyServer) stop() {
	p.t.Helper()
	if err := p.Stop(); err != nil {
		log, _ := os.ReadFile(p.LogPath)
		p.t.Fatalf("%v; log:\n%s", err, log)
	}
}

// log returns the server's log so far.
func (p *proxyServer) log() string {
	p.t.Helper()
	data, err := os.ReadFile(p.LogPath)
	if err != nil {
		p.t.Fatal(err)
	}
	return string(data)
}

// withProxyConfig runs containerd-stock with the README's proxy
// configuration (config/containerd-proxy.toml) pointed at socket and root,
// over the harness's private paths.
func withProxyConfig(t *testing.T, socket, root string) envOption {
	return func(o *harness.Options) {
		o.Binary = "containerd-stock"
		prev := o.Edit
		o.Edit = func(cfg map[string]any) {
			if prev != nil {
				prev(cfg)
			}
			if err := harness.UseProxyConfig(cfg, socket, root); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// newProxyEnv starts containerd-stock with the proxy configuration and
// max_concurrent_unpacks unpacks, then the server on the socket that
// configuration names, reading layers from that containerd's content store.
// Everything is stopped, and checked to have left nothing, at the end.
func newProxyEnv(t *testing.T, unpacks int) (*env, *proxyServer) {
	t.Helper()
	dir, err := os.MkdirTemp("", "fo-px-")
	if err != nil {
		t.Fatal(err)
	}
	// Registered before the server and containerd: runs after both stopped.
	t.Cleanup(func() {
		left, err := harness.WaitNoLeftovers(dir, 15*time.Second)
		if err != nil {
			t.Errorf("looking for leftovers: %v", err)
		}
		if !left.Empty() {
			t.Errorf("left behind (cleaning up now):\n%s", left)
			_ = harness.CleanLeftovers(left)
		}
		if err := os.RemoveAll(dir); err != nil {
			t.Error(err)
		}
	})
	runDir := os.Getenv("XDG_RUNTIME_DIR")
	if runDir == "" {
		runDir = dir
	}
	socket := filepath.Join(runDir, "containerd-fuse-overlayfs", "grpc.sock")
	root := filepath.Join(dir, "root")
	// containerd first: the server reads its content store, whose place
	// the harness chooses. containerd dials a proxy only when it uses it.
	e := newEnv(t, withProxyConfig(t, socket, root), withUnpacks(unpacks))
	p := startProxy(t, socket, root, filepath.Join(e.c.Root, harness.ContentSubdir), filepath.Join(dir, "grpc.log"))
	// Stopped before the server (cleanups run last-registered first): the
	// containers' snapshots are removed through it.
	t.Cleanup(func() {
		if e.c.Running() {
			removed, err := e.c.Sweep(e.ctx)
			if err != nil {
				t.Errorf("sweep: %v", err)
			}
			if len(removed) > 0 && !t.Failed() {
				t.Errorf("test left tasks or containers behind: %v", removed)
			}
			if err := e.c.Stop(); err != nil {
				t.Error(err)
			}
		}
		if p.Running() {
			p.stop()
		}
	})
	for path, want := range map[string]os.FileMode{socket: os.ModeSocket | 0o600, filepath.Dir(socket): os.ModeDir | 0o700} {
		if st, err := os.Lstat(path); err != nil || st.Mode() != want {
			t.Fatalf("%s: %v, %v; want mode %v", path, st, err, want)
		}
	}
	plugins := e.ctr("plugins", "ls")
	for _, pattern := range []string{
		`io\.containerd\.snapshotter\.v1\s+fuse-overlayfs\s+.*\sok`,
		`io\.containerd\.differ\.v1\s+` + harness.ProxyDifferID + `\s+.*\sok`,
	} {
		if !regexpMatch(pattern, plugins) {
			t.Fatalf("the proxy plugins are not listed as ok (%s):\n%s", pattern, plugins)
		}
	}
	return e, p
}

// appliedDirectly counts the layers the server says it applied directly.
func (p *proxyServer) appliedDirectly() int {
	return strings.Count(p.log(), `level=info msg="layer applied directly"`)
}

// diffCallMetadata returns the metadata a server's log shows for
// containerd's diff calls (at debug level), each distinct set once, keys
// sorted.
func diffCallMetadata(log string) []string {
	seen := map[string]bool{}
	var sets []string
	for _, line := range strings.Split(log, "\n") {
		if !strings.Contains(line, `msg="diff call"`) {
			continue
		}
		var keys []string
		for _, f := range strings.Fields(line) {
			if k, _, ok := strings.Cut(f, "="); ok && strings.HasPrefix(k, "md.") {
				keys = append(keys, f)
			}
		}
		sort.Strings(keys)
		set := strings.Join(keys, " ")
		if !seen[set] {
			seen[set] = true
			sets = append(sets, set)
		}
	}
	return sets
}

// TestRootlessProxy runs an unmodified containerd (containerd's own main,
// bin/containerd-stock) as an unprivileged user inside RootlessKit, with
// the snapshotter and its differ reached as proxy plugins served by
// containerd-fuse-overlayfs-grpc (config/containerd-proxy.toml).
//
// sequential: pulls are applied by the server directly (its log says so for
// every layer, and no layer holds a marker writing through FUSE leaves),
// also through the diff service (`ctr pull --local`); containers run;
// whiteouts and opaque directories are right; the trees equal native's;
// crictl imagefsinfo reports the server's root; the server is stopped with
// SIGTERM and restarted, and the snapshots are still there and usable.
//
// parallel: with max_concurrent_unpacks = 4 (the proxy declares rebase),
// every layer is applied before its parent is known, and the trees of all
// fast-path test images equal native's.
func TestRootlessProxy(t *testing.T) {
	if !isInner(t) {
		newRootlessRun(t, []string{"containerd-stock", "containerd-fuse-overlayfs-grpc"}, true).run()
		return
	}
	innerSetup(t)
	innerFixture(t)
	t.Run("sequential", testProxySequential)
	t.Run("parallel", testProxyParallel)
}

func testProxySequential(t *testing.T) {
	e, p := newProxyEnv(t, 1)
	ref := e.fx.refs[e.fx.features.Repo]
	e.ctr("images", "pull", "--plain-http", "--snapshotter", sn, "--platform", "linux/"+goarch(), ref)
	// Before any container runs: containers write through FUSE.
	e.checkDirectLog(p.LogPath, p.Root, false, len(e.fx.features.Layers))
	e.checkNoFUSEMarkers(p.Root)
	direct := p.appliedDirectly()

	// The diff service (client-side unpack) reaches the server first too.
	e.ctr("-n", "local", "images", "pull", "--local", "--plain-http", "--snapshotter", sn, ref)
	if n := p.appliedDirectly(); n <= direct {
		t.Errorf("ctr pull --local: the server applied no layer (%d before, %d after)", direct, n)
	}
	if out := e.ctr(append(append([]string{"-n", "local", "run"}, ctrRunFlags...), "--rm", "--snapshotter", sn, ref, "local-cat")...); out != featuresOutput {
		t.Errorf("container output (--local pull): got %q, want %q", out, featuresOutput)
	}
	e.ctr("-n", "local", "images", "rm", "--sync", ref)
	// Another snapshotter's layers through the diff service: the server
	// declines them (Unimplemented through gRPC, ErrNotImplemented again in
	// containerd) and the diff service goes on to the walking differ.
	e.ctr("-n", "local", "images", "pull", "--local", "--plain-http", "--snapshotter", "native", ref)
	if !strings.Contains(p.log(), "declined a layer") {
		t.Errorf("the server's log shows no declined layer after a --local pull to native")
	}
	e.ctr("-n", "local", "images", "rm", "--sync", ref)
	// What containerd sends with a proxied Apply besides the request: the
	// transfer service's and the diff service's calls.
	for _, md := range diffCallMetadata(p.log()) {
		t.Logf("containerd's diff call carried: %s", md)
	}
	e.checkImageFsInfo(p.Root)

	e.checkFeatures(ref, sn, "px")
	e.checkContainerWrite(ref, sn, "px-write", "/written-through-proxy")
	// A container whose snapshot must outlive the server's restart.
	e.run("--snapshotter", sn, ref, "px-keep", images.ProbePath, "write", "/kept", "kept across the restart")
	upper := e.upperdirOf("default", sn, "px-keep")
	if !strings.HasPrefix(upper, p.Root+"/") {
		t.Fatalf("upper directory %s is not below the server's root %s", upper, p.Root)
	}
	before := e.snapshots("default", sn)

	p.stop()
	// containerd really asks the server: with it gone, this fails.
	if out, err := e.c.Ctr(e.ctx, "snapshots", "--snapshotter", sn, "mounts", "/mnt", "px-keep"); err == nil {
		t.Fatalf("snapshot mounts answered with the server stopped: %s", out)
	}
	p.restart()
	err := harness.Poll(30*time.Second, 100*time.Millisecond, func() error {
		_, err := e.c.Ctr(e.ctx, "snapshots", "--snapshotter", sn, "mounts", "/mnt", "px-keep")
		return err
	})
	if err != nil {
		t.Fatalf("containerd does not reach the restarted server: %v", err)
	}
	after := e.snapshots("default", sn)
	if fmt.Sprint(after) != fmt.Sprint(before) {
		t.Fatalf("snapshots changed across the restart:\nbefore %v\nafter  %v", before, after)
	}
	assertFile(t, upper, "kept", "kept across the restart")
	// The committed layers serve new containers after the restart.
	e.checkFeatures(ref, sn, "px2")

	// Removing everything goes through the server's Remove and Cleanup.
	e.ctr("containers", "rm", "px-keep")
	e.ctr("images", "rm", "--sync", ref)
	e.waitNoSnapshots(p.Root)

	// The trees, pulled afresh through the restarted server's differ.
	direct = p.appliedDirectly()
	for _, spec := range []images.Spec{e.fx.features, e.fx.many} {
		e.checkSameTreeAsNative(spec, "pxt")
		e.ctr("images", "rm", "--sync", e.fx.refs[spec.Repo])
	}
	if n := p.appliedDirectly() - direct; n < len(e.fx.many.Layers)/2 {
		t.Errorf("the server applied %d layers of the trees' images directly, want most of theirs", n)
	}
}

func testProxyParallel(t *testing.T) {
	e, p := newProxyEnv(t, 4)
	specs, dirs := fastPathImages(t, e.fx)
	layers := 0
	for _, spec := range specs {
		ref := e.fx.refs[spec.Repo]
		e.ctr("images", "pull", "--plain-http", "--snapshotter", sn, "--platform", "linux/"+goarch(), ref)
		e.ctr("images", "pull", "--plain-http", "--snapshotter", "native", "--platform", "linux/"+goarch(), ref)
		layers += len(spec.Layers)
	}
	e.checkDirectLog(p.LogPath, p.Root, true, layers)
	e.checkNoFUSEMarkers(p.Root)
	for i, spec := range specs {
		dir := dirs[spec.Repo]
		if dir == "" {
			dir = "/data"
		}
		e.sameTree(e.fx.refs[spec.Repo], dir, fmt.Sprintf("pxp%d", i))
	}
	for _, spec := range specs {
		e.ctr("images", "rm", "--sync", e.fx.refs[spec.Repo])
	}
	e.waitNoSnapshots(p.Root)
}

// waitNoSnapshots waits until the snapshotter root holds no snapshot
// directory (removal and the garbage collector's Cleanup are asynchronous).
func (e *env) waitNoSnapshots(root string) {
	e.t.Helper()
	err := harness.Poll(30*time.Second, 100*time.Millisecond, func() error {
		entries, err := os.ReadDir(filepath.Join(root, "snapshots"))
		if err != nil {
			return err
		}
		if len(entries) > 0 {
			return fmt.Errorf("%d snapshot directories left", len(entries))
		}
		return nil
	})
	if err != nil {
		e.t.Fatalf("after removing the images: %v", err)
	}
}

// checkImageFsInfo: CRI reports the image file system by the snapshotter
// root the configuration exports (kubelet's image garbage collection
// watches the disk holding it).
func (e *env) checkImageFsInfo(root string) {
	t := e.t
	t.Helper()
	out := e.crictl("imagefsinfo", "-o", "json")
	var info struct {
		Status struct {
			ImageFilesystems []struct {
				FsID struct {
					Mountpoint string `json:"mountpoint"`
				} `json:"fsId"`
			} `json:"imageFilesystems"`
		} `json:"status"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("crictl imagefsinfo: %v\n%s", err, out)
	}
	fs := info.Status.ImageFilesystems
	if len(fs) == 0 || fs[0].FsID.Mountpoint != root {
		t.Fatalf("crictl imagefsinfo reports %+v, want the mountpoint %s (the server's root):\n%s", fs, root, out)
	}
}
