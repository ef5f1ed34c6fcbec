package integration

// Rootless tests. Each test runs twice: the outer run (as real root) sets up
// an unprivileged user, a staging directory the user owns and the registry,
// then starts this same test binary as that user inside a new RootlessKit,
// asking it (through innerEnv) to run the test's inner part. Everything the
// inner part mounts lives in RootlessKit's mount namespace, so containerd,
// fuse-overlayfs and the checks all run below that one RootlessKit.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"

	fuseoverlayfs "github.com/fosnap/fuseoverlayfs"
	"github.com/fosnap/fuseoverlayfs/hostcheck"
	"github.com/fosnap/fuseoverlayfs/integration/internal/harness"
	"github.com/fosnap/fuseoverlayfs/integration/internal/images"
	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// Environment of the inner run.
const (
	// innerEnv names the test whose inner part this process runs.
	innerEnv = "FOSNAP_ROOTLESS_INNER"
	// innerRegistryEnv is the registry (host:port) the outer run started.
	innerRegistryEnv = "FOSNAP_ROOTLESS_REGISTRY"
	// innerProbeEnv is the path of the probe program the images hold.
	innerProbeEnv = "FOSNAP_ROOTLESS_PROBE"
)

// innerTimeout bounds one inner run.
const innerTimeout = 6 * time.Minute

// isInner reports whether this process is the inner run of t.
func isInner(t *testing.T) bool { return os.Getenv(innerEnv) == t.Name() }

// rootlessRun is the outer side of one rootless test.
type rootlessRun struct {
	t     *testing.T
	user  *harness.RootlessUser
	stage string // owned by the user; removed at the end
	repo  string // stage/repo: go.mod, bin/, config/ as harness.RepoRoot expects
	env   []string
}

// newRootlessRun prepares the host and a staging directory. bins are the
// files of bin/ the inner run needs; withFixture starts the registry and
// pushes the test images (as root) for it.
func newRootlessRun(t *testing.T, bins []string, withFixture bool) *rootlessRun {
	t.Helper()
	testutil.RequireRoot(t)
	if withFixture {
		requirePrereqs(t)
	}
	for _, tool := range []string{"fuse-overlayfs", "mount.fuse3"} {
		if _, err := harness.LookPath(tool); err != nil {
			testutil.Unavailable(t, "%v (run `make deps`)", err)
		}
	}
	u, err := harness.SetupRootless()
	if err != nil {
		testutil.Unavailable(t, "rootless set-up: %v", err)
	}
	binDir, err := harness.BinDir()
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range bins {
		if _, err := os.Stat(filepath.Join(binDir, b)); err != nil {
			testutil.Unavailable(t, "bin/%s is missing (run `make binaries`): %v", b, err)
		}
	}
	r := &rootlessRun{t: t, user: u}
	// The user must be able to walk down to the staging directory; one
	// above that lost its x bit for others (it happened to / here, changed
	// by another test run as root) fails every step with a puzzling EACCES.
	for d := filepath.Clean(os.TempDir()); ; d = filepath.Dir(d) {
		st, err := os.Stat(d)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm()&0o001 == 0 {
			t.Fatalf("%s has mode %v, not searchable by other users: the rootless user cannot work below it", d, st.Mode())
		}
		if d == "/" {
			break
		}
	}
	// A short name: the inner containerd's socket and the fuse-overlayfs
	// command lines hold paths below it.
	r.stage, err = os.MkdirTemp("", "fo-rl-")
	if err != nil {
		t.Fatal(err)
	}
	// Registered first, so it runs last.
	t.Cleanup(r.cleanup)
	r.repo = filepath.Join(r.stage, "repo")
	for _, d := range []string{"repo/bin", "repo/config", "repo/integration", "home", "tmp", "run"} {
		if err := os.MkdirAll(filepath.Join(r.stage, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(r.repo, "go.mod"), []byte("module rootless.stage\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := harness.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cfgFiles, err := os.ReadDir(filepath.Dir(cfg))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range cfgFiles {
		if !f.Type().IsRegular() {
			continue
		}
		if err := linkOrCopy(filepath.Join(filepath.Dir(cfg), f.Name()), filepath.Join(r.repo, "config", f.Name())); err != nil {
			t.Fatal(err)
		}
	}
	// harness.Missing wants all of these even when a test uses fewer.
	for _, b := range append(append([]string{}, harness.Binaries...), bins...) {
		dst := filepath.Join(r.repo, "bin", b)
		if _, err := os.Lstat(dst); err == nil {
			continue
		}
		if err := linkOrCopy(filepath.Join(binDir, b), dst); err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Fatal(err)
		}
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	if err := linkOrCopy(self, filepath.Join(r.stage, "integration.test")); err != nil {
		t.Fatal(err)
	}

	path := harness.SystemPath(filepath.Join(r.repo, "bin"))
	if goBin, err := exec.LookPath("go"); err == nil {
		path += ":" + filepath.Dir(goBin) // harness.Missing looks for it
	}
	r.env = []string{
		innerEnv + "=" + t.Name(),
		"CI=true", // inside, every prerequisite is there: a missing one is a failure
		"PATH=" + path,
		"HOME=" + filepath.Join(r.stage, "home"),
		"TMPDIR=" + filepath.Join(r.stage, "tmp"),
		"XDG_RUNTIME_DIR=" + filepath.Join(r.stage, "run"),
		"USER=" + u.Name,
		"LOGNAME=" + u.Name,
		"LANG=C.UTF-8",
		// Rootless, containerd reports the cgroup v1 deprecation to every
		// ctr, which would print it on each call and bury the messages
		// that matter in a failure's output.
		"CONTAINERD_SUPPRESS_DEPRECATION_WARNINGS=true",
	}
	if withFixture {
		f := getFixture(t)
		probe := filepath.Join(r.stage, "probe")
		if err := os.WriteFile(probe, f.probe, 0o644); err != nil {
			t.Fatal(err)
		}
		r.env = append(r.env, innerRegistryEnv+"="+f.registry.Addr, innerProbeEnv+"="+probe)
	}
	if err := chownTree(r.stage, u.UID, u.GID); err != nil {
		t.Fatal(err)
	}
	return r
}

// linkOrCopy hard-links src to dst (cheap: bin/ holds ~250 MB) or copies it
// when they are on different file systems.
func linkOrCopy(src, dst string) error {
	if err := os.Link(src, dst); err == nil {
		return nil
	}
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer func() { _ = in.Close() }()
	st, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, st.Mode().Perm())
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		_ = out.Close()
		return err
	}
	return out.Close()
}

// chownTree gives the user the directories and the files created for it;
// hard links to root's files (bin/, the test binary) stay root's and
// readable.
func chownTree(root string, uid, gid int) error {
	return filepath.Walk(root, func(path string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if st, ok := info.Sys().(*syscall.Stat_t); ok && st.Nlink > 1 && !info.IsDir() {
			return nil
		}
		return os.Lchown(path, uid, gid)
	})
}

// run starts the inner part as the user inside RootlessKit, waits for it
// and fails the test unless the inner test ran and passed.
func (r *rootlessRun) run() {
	t := r.t
	t.Helper()
	args := []string{
		filepath.Join(r.stage, "integration.test"),
		"-test.run", "^" + t.Name() + "$", "-test.v", "-test.count=1",
		"-test.timeout", innerTimeout.String(),
	}
	cmd, err := r.user.Command(context.Background(), filepath.Join(r.stage, "rootlesskit"), r.env, args...)
	if err != nil {
		t.Fatal(err)
	}
	cmd.Dir = filepath.Join(r.repo, "integration")
	var out harness.Output
	cmd.Stdout, cmd.Stderr = &out, &out
	// RootlessKit's children may hold the output open after it exited.
	cmd.WaitDelay = 10 * time.Second
	start := time.Now()
	p, err := testutil.StartProcess("inner run", cmd)
	if err != nil {
		t.Fatal(err)
	}
	// Past its own -test.timeout, the inner run is killed by its PID.
	err = p.WaitSuccess(innerTimeout + time.Minute)
	t.Logf("inner run (uid %d under rootlesskit, %s):\n%s", r.user.UID, time.Since(start).Round(time.Millisecond), indent(out.String()))
	if err != nil {
		if os.Getenv("FOSNAP_DEBUG") != "" {
			out, _ := exec.Command("ls", "-laR", r.stage).CombinedOutput()
			t.Logf("%s", out)
		}
		t.Fatalf("inner run failed: %v", err)
	}
	for _, line := range strings.Split(out.String(), "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "--- SKIP") {
			t.Fatalf("inner run skipped a test: %s", line)
		}
	}
	if !strings.Contains(out.String(), "--- PASS: "+t.Name()+" ") {
		t.Fatalf("inner run did not report %s as passed", t.Name())
	}
}

func indent(s string) string {
	var b strings.Builder
	sc := bufio.NewScanner(strings.NewReader(s))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		b.WriteString("    | ")
		b.WriteString(sc.Text())
		b.WriteByte('\n')
	}
	return b.String()
}

// cleanup checks that no process of the run is left (the inner run's
// mounts live in RootlessKit's mount namespace, which goes away with its
// last process), kills leftovers by PID, and removes the staging
// directory as root: files written in the user namespace belong to the
// user's subordinate IDs.
func (r *rootlessRun) cleanup() {
	t := r.t
	left, err := harness.WaitNoLeftovers(r.stage, 15*time.Second)
	if err != nil {
		t.Errorf("looking for leftovers: %v", err)
	}
	if !left.Empty() {
		t.Errorf("left behind by the rootless run (cleaning up now):\n%s", left)
		if err := harness.CleanLeftovers(left); err != nil {
			t.Error(err)
		}
	}
	if err := os.RemoveAll(r.stage); err != nil {
		t.Errorf("remove %s: %v", r.stage, err)
	}
}

// ctrRunFlags are added to every `ctr run` of the rootless tests: inside
// RootlessKit, runc cannot create cgroups (cgroup v1 here); with no cgroup
// path and no CPU shares (ctr's default is 1024) it does not try.
var ctrRunFlags []string

// run is `ctr run` with ctrRunFlags.
func (e *env) run(args ...string) string {
	e.t.Helper()
	return e.ctr(append(append([]string{"run"}, ctrRunFlags...), args...)...)
}

// innerSetup is the start of every inner part: it checks that the process
// really is an unprivileged user mapped to root in a user namespace, and
// makes /run/containerd writable (containerd keeps the shims' sockets in
// /run/containerd/s whatever its state directory; RootlessKit's copy of
// /run only links to the host's read-only /run/containerd, if it exists).
func innerSetup(t *testing.T) {
	t.Helper()
	uidMap, err := os.ReadFile("/proc/self/uid_map")
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(uidMap))
	if os.Geteuid() != 0 || len(f) < 3 || f[0] != "0" || f[1] == "0" {
		t.Fatalf("inner run is not root in a user namespace of an unprivileged user: euid %d, uid_map %q", os.Geteuid(), uidMap)
	}
	t.Logf("uid_map: %s", strings.Join(strings.Fields(string(uidMap)), " "))
	const run = "/run/containerd"
	if st, err := os.Lstat(run); err == nil && st.Mode()&os.ModeSymlink != 0 {
		if err := os.Remove(run); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.MkdirAll(run, 0o711); err != nil {
		t.Fatal(err)
	}
	ctrRunFlags = []string{"--cgroup", "", "--cpu-shares", "0"}
}

// innerFixture gives the inner run the outer run's registry and images
// (it cannot build them: no go command cache, no root).
func innerFixture(t *testing.T) *fixture {
	t.Helper()
	fxOnce.Do(func() {
		addr := os.Getenv(innerRegistryEnv)
		if addr == "" {
			fxErr = fmt.Errorf("inner run: %s is not set", innerRegistryEnv)
			return
		}
		probe, err := os.ReadFile(os.Getenv(innerProbeEnv))
		if err != nil {
			fxErr = fmt.Errorf("inner run: the probe program: %w", err)
			return
		}
		f := &fixture{probe: probe, registry: harness.ExternalRegistry(addr), refs: map[string]string{}}
		fx = f
		if f.tmp, fxErr = os.MkdirTemp("", "fo-e2e-fixture-"); fxErr != nil {
			return
		}
		f.features = images.Features(probe)
		f.many = images.Many(probe, manyLayers)
		f.pause = images.Pause(probe)
		for _, spec := range []images.Spec{f.features, f.many, f.pause} {
			f.refs[spec.Repo] = spec.Ref(addr)
		}
	})
	if fxErr != nil {
		t.Fatalf("test fixture: %v", fxErr)
	}
	return fx
}

// TestRootlessSnapshotterSuite runs containerd's snapshotter suite as an
// unprivileged user inside RootlessKit.
func TestRootlessSnapshotterSuite(t *testing.T) {
	if !isInner(t) {
		newRootlessRun(t, nil, false).run()
		return
	}
	innerSetup(t)
	// The host checks pass rootless: /dev/fuse opens, the probe mounts.
	if info, err := hostcheck.Require(filepath.Join(t.TempDir(), "check")); err != nil {
		t.Fatal(err)
	} else {
		t.Logf("host check: fuse-overlayfs %s at %s", info.Version, info.FuseOverlayfs)
	}
	for _, tc := range []struct {
		name string
		opts []fuseoverlayfs.Opt
	}{
		{"sync", nil},
		{"async", []fuseoverlayfs.Opt{fuseoverlayfs.AsynchronousRemove}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			testsuite.SnapshotterSuite(t, "fuse-overlayfs", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
				sn, err := fuseoverlayfs.NewSnapshotter(root, tc.opts...)
				if err != nil {
					return nil, nil, err
				}
				return sn, sn.Close, nil
			})
		})
	}
	testutil.RequireNoLeftovers(t, os.TempDir())
}

// TestRootlessBuiltin runs our containerd (the plugin built in) as an
// unprivileged user inside RootlessKit: pull from the registry, run
// containers on fuse-overlayfs, check whiteouts and opaque directories
// inside the container, find the container's writes in its snapshot, and
// compare the container's tree with the native snapshotter's.
func TestRootlessBuiltin(t *testing.T) {
	if !isInner(t) {
		newRootlessRun(t, nil, true).run()
		return
	}
	innerSetup(t)
	innerFixture(t)
	e := newEnv(t)
	ref := e.fx.refs[e.fx.features.Repo]
	e.ctr("images", "pull", "--plain-http", "--snapshotter", sn, "--platform", "linux/"+goarch(), ref)
	e.checkFeatures(ref, sn, "rl")
	e.checkContainerWrite(ref, sn, "rl-write", "/written-rootless")
	for _, spec := range []images.Spec{e.fx.features, e.fx.many} {
		e.checkSameTreeAsNative(spec, "rl")
		e.ctr("images", "rm", "--sync", e.fx.refs[spec.Repo])
	}
}

// checkFeatures runs the features image on snapshotter: its default
// command's output, the tree a container sees (checkTree: whiteouts, opaque
// directories, hard links, modes, owners, xattrs), and files deleted by a
// layer opened by their path, which must fail.
func (e *env) checkFeatures(ref, snapshotter, prefix string) {
	t := e.t
	t.Helper()
	if out := e.run("--rm", "--snapshotter", snapshotter, ref, prefix+"-cat"); out != featuresOutput {
		t.Fatalf("container output: got %q, want %q", out, featuresOutput)
	}
	tree := treeLines(e.run("--rm", "--snapshotter", snapshotter, ref, prefix+"-tree", images.ProbePath, "treedump", "/"))
	checkTree(t, e.fx.features, tree)
	for _, p := range []string{"/data/deleted", "/data/d1/old", "/data/d2/old", "/data/d2/sub/oldsub", "/data/gone-tree/sub/f"} {
		out, err := e.c.Ctr(e.ctx, append(append([]string{"run"}, ctrRunFlags...), "--rm", "--snapshotter", snapshotter, ref, prefix+"-open", images.ProbePath, "cat", p)...)
		// A failed `ctr run --rm` may leave its container behind.
		_, _ = e.c.Ctr(e.ctx, "containers", "rm", prefix+"-open")
		if err == nil {
			t.Errorf("the container opened %s, which a layer deleted: %q", p, out)
		} else if !strings.Contains(err.Error(), "no such file or directory") {
			t.Errorf("opening %s failed, but not with ENOENT: %v", p, err)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
}

// checkContainerWrite lets a container write a file and finds it in the
// upper directory of the container's active snapshot.
func (e *env) checkContainerWrite(ref, snapshotter, id, file string) {
	t := e.t
	t.Helper()
	e.run("--snapshotter", snapshotter, ref, id, images.ProbePath, "write", file, "written by "+id)
	e.assertChain("default", snapshotter, id, len(e.fx.features.Layers))
	upper := e.upperdirOf("default", snapshotter, id)
	got, err := os.ReadFile(filepath.Join(upper, file))
	if err != nil || string(got) != "written by "+id {
		t.Fatalf("the container's write in %s: %q, %v", upper, got, err)
	}
	e.ctr("containers", "rm", id)
}

// upperdirOf is upperdir for any snapshotter name (the proxy's too).
func (e *env) upperdirOf(ns, snapshotter, key string) string {
	e.t.Helper()
	out := e.ctr("-n", ns, "snapshots", "--snapshotter", snapshotter, "mounts", "/mnt", key)
	for _, field := range strings.FieldsFunc(out, func(r rune) bool { return r == ' ' || r == ',' || r == '\n' }) {
		if v, ok := strings.CutPrefix(field, "upperdir="); ok {
			return v
		}
	}
	e.t.Fatalf("no upperdir in the mounts of %s: %s", key, out)
	return ""
}

// checkSameTreeAsNative is TestSameTreeAsNative's comparison: the whole
// tree a container sees on fuse-overlayfs against the tree on containerd's
// native snapshotter (plain copies, no overlay), then checkTree.
func (e *env) checkSameTreeAsNative(spec images.Spec, prefix string) {
	t := e.t
	t.Helper()
	ref := e.fx.refs[spec.Repo]
	trees := map[string][]string{}
	for _, s := range []string{"native", sn} {
		e.ctr("images", "pull", "--plain-http", "--snapshotter", s, "--platform", "linux/"+goarch(), ref)
		trees[s] = treeLines(e.run("--rm", "--snapshotter", s, ref, prefix+"-tree-"+s, images.ProbePath, "treedump", "/"))
	}
	if diff := diffLines(trees["native"], trees[sn]); diff != "" {
		t.Fatalf("%s: tree on fuse-overlayfs differs from native (- native, + fuse-overlayfs):\n%s", ref, diff)
	}
	checkTree(t, spec, trees[sn])
}

// lineDiff lists the lines only in a (-) and only in b (+).
func lineDiff(a, b string) string {
	in := func(s string) map[string]bool {
		m := map[string]bool{}
		for _, l := range strings.Split(s, "\n") {
			m[l] = true
		}
		return m
	}
	ma, mb := in(a), in(b)
	var d strings.Builder
	for _, l := range strings.Split(a, "\n") {
		if !mb[l] {
			d.WriteString("- " + l + "\n")
		}
	}
	for _, l := range strings.Split(b, "\n") {
		if !ma[l] {
			d.WriteString("+ " + l + "\n")
		}
	}
	return d.String()
}

func regexpMatch(pattern, s string) bool {
	return regexp.MustCompile(pattern).MatchString(s)
}

// TestReadmeShowsRootlessFiles keeps the proxy configuration (README.md)
// and the systemd unit (docs/rootless.md) and the files (the configuration
// TestRootlessProxy loads) identical.
func TestReadmeShowsRootlessFiles(t *testing.T) {
	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ file, lang, doc string }{
		{harness.ProxyConfigFile, "toml", "README.md"},
		{"containerd-fuse-overlayfs.service", "ini", rootlessDoc},
	} {
		doc, err := os.ReadFile(filepath.Join(root, c.doc))
		if err != nil {
			t.Fatal(err)
		}
		data, err := os.ReadFile(filepath.Join(root, "config", c.file))
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(doc), "```"+c.lang+"\n"+string(data)+"```") {
			t.Errorf("%s does not show config/%s verbatim in a %s block", c.doc, c.file, c.lang)
		}
	}
}

// TestIDMappedSnapshot runs containers in their own user namespace on
// fuse-overlayfs: with `ctr run --uidmap/--gidmap --remap-labels` containerd
// passes the mapping to the snapshotter as labels (it declares remap-ids),
// the snapshotter mounts with fuse-overlayfs' uidmapping/gidmapping, and the
// container sees every file owned as in the image, although its IDs are
// others outside. As an unprivileged user inside RootlessKit, and as root.
func TestIDMappedSnapshot(t *testing.T) {
	t.Run("rootless", func(t *testing.T) {
		if !isInner(t) {
			newRootlessRun(t, nil, true).run()
			return
		}
		innerSetup(t)
		innerFixture(t)
		e := newEnv(t)
		// Container IDs 0..65534 are IDs 1..65535 of RootlessKit's
		// namespace (which itself has 0..65536): every owner in the image,
		// nobody (65534) included, is mapped, none to itself.
		e.checkIDMapped(1, 65535)
	})
	t.Run("root", func(t *testing.T) {
		e := newEnv(t)
		e.checkIDMapped(300000, 65536)
	})
}

// checkIDMapped runs the features image with container IDs 0..size-1
// mapped to host..host+size-1.
func (e *env) checkIDMapped(host, size int) {
	t := e.t
	t.Helper()
	// runc mounts the container's root file system as the container's root
	// (a mapped ID, without privilege over the directories above), who must
	// be able to walk the path to the bundle: the private 0700 directories
	// above it become 0711.
	dirs := []string{e.dir, e.c.State}
	if isInner(t) {
		tmp := filepath.Clean(os.TempDir())
		dirs = append(dirs, filepath.Dir(tmp), tmp)
	}
	for _, d := range dirs {
		if err := os.Chmod(d, 0o711); err != nil {
			t.Fatal(err)
		}
	}
	ref := e.fx.refs[e.fx.features.Repo]
	e.ctr("images", "pull", "--plain-http", "--snapshotter", sn, "--platform", "linux/"+goarch(), ref)
	mapping := fmt.Sprintf("0:%d:%d", host, size)
	idmap := []string{"--uidmap", mapping, "--gidmap", mapping, "--remap-labels"}

	plain := treeLines(e.run("--rm", "--snapshotter", sn, ref, "idm-plain", images.ProbePath, "treedump", "/"))
	args := append(append([]string{"--rm"}, idmap...), "--snapshotter", sn, ref, "idm-tree", images.ProbePath, "treedump", "/")
	mapped := treeLines(e.run(args...))
	if diff := diffLines(plain, mapped); diff != "" {
		t.Fatalf("the ID-mapped container sees another tree (- unmapped, + mapped):\n%s", diff)
	}
	checkTree(t, e.fx.features, mapped)

	// The container is in a user namespace with that mapping.
	args = append(append([]string{"--rm"}, idmap...), "--snapshotter", sn, ref, "idm-userns", images.ProbePath, "cat", "/proc/self/uid_map")
	if got, want := strings.Join(strings.Fields(e.run(args...)), " "), fmt.Sprintf("0 %d %d", host, size); got != want {
		t.Fatalf("uid_map in the container: %q, want %q", got, want)
	}

	// Its snapshot carries the labels, and is the image's chain (no
	// chowned copy of the image was made).
	args = append(append([]string{}, idmap...), "--snapshotter", sn, ref, "idm-write", images.ProbePath, "write", "/idmapped", "written in a user namespace")
	e.run(args...)
	info := e.ctr("snapshots", "--snapshotter", sn, "info", "idm-write")
	assertContains(t, "snapshot info", info,
		fmt.Sprintf(`"containerd.io/snapshot/uidmapping": %q`, mapping), fmt.Sprintf(`"containerd.io/snapshot/gidmapping": %q`, mapping))
	e.assertChain("default", sn, "idm-write", len(e.fx.features.Layers))
	for key := range e.snapshots("default", sn) {
		if strings.Contains(key, "remap") || strings.Contains(key, "userns") {
			t.Errorf("containerd made a remapped copy of the image (%s): the labels were not used", key)
		}
	}
	// A file the container's root wrote is stored as owned by root of the
	// image's ID space: the layer stays mappable to any other range.
	upper := e.upperdirOf("default", sn, "idm-write")
	assertFile(t, upper, "idmapped", "written in a user namespace")
	if uid, gid := testutil.Owner(t, filepath.Join(upper, "idmapped")); uid != 0 || gid != 0 {
		t.Errorf("file written by the container's root is stored as %d:%d, want 0:0", uid, gid)
	}
	e.ctr("containers", "rm", "idm-write")
	e.ctr("images", "rm", "--sync", ref)
}
