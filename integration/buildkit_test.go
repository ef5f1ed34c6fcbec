package integration

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fosnap/fuseoverlayfs/integration/internal/harness"
	"github.com/fosnap/fuseoverlayfs/integration/internal/images"
	"github.com/pelletier/go-toml/v2"
)

// buildFiles is how many files the test builds write or copy: enough for
// several directories, small enough for CI (make bench-build uses 20,000).
const buildFiles = 300

// buildTreeSnapshotters are the snapshotters every built image is run on;
// its tree must be the same on each.
var buildTreeSnapshotters = []string{sn, "overlayfs", "native"}

// buildkitEnv is a test's containerd with a buildkitd whose containerd
// worker builds on fuse-overlayfs, and the base image in the registry.
type buildkitEnv struct {
	*env
	bk      *harness.Buildkitd
	base    string // the base image's reference
	metrics string // containerd's [metrics] address
}

// newBuildkitEnv starts containerd, pushes the base image and starts
// buildkitd (stopped by its PID before containerd stops); rootless: inside
// the rootless tests' RootlessKit, with BuildKit's rootless worker mode.
func newBuildkitEnv(t *testing.T, rootless bool) *buildkitEnv {
	t.Helper()
	requireBuildkit(t)
	metrics := freeAddr(t)
	e := newEnv(t, func(o *harness.Options) {
		o.Edit = func(cfg map[string]any) { harness.Set(cfg, metrics, "metrics", "address") }
	})
	spec, err := harness.BuildBase(e.fx.probe)
	if err != nil {
		t.Fatal(err)
	}
	base, err := images.Push(e.fx.registry.Addr, spec)
	if err != nil {
		t.Fatal(err)
	}
	bk, err := harness.StartBuildkitd(e.ctx, harness.BuildkitOptions{
		Dir: filepath.Join(e.dir, "bk"), Containerd: e.c.Address, Registry: e.fx.registry.Addr, Rootless: rootless,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("buildkitd pid %d", bk.PID())
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("buildkitd log tail:\n%s", bk.LogTail(20))
		}
		if err := bk.Stop(); err != nil {
			t.Error(err)
		}
	})
	return &buildkitEnv{env: e, bk: bk, base: base, metrics: metrics}
}

// requireBuildkit is requirePrereqs for what only the BuildKit tests
// need: bin/buildkitd, bin/buildctl and the host's static busybox.
func requireBuildkit(t *testing.T) {
	t.Helper()
	bin, err := harness.BinDir()
	if err != nil {
		t.Fatal(err)
	}
	var missing []string
	for _, b := range []string{"buildkitd", "buildctl"} {
		if _, err := os.Stat(filepath.Join(bin, b)); err != nil {
			missing = append(missing, fmt.Sprintf("bin/%s is missing (run `make binaries`)", b))
		}
	}
	if _, err := harness.LookPath("busybox"); err != nil {
		missing = append(missing, "busybox not found on PATH (the Debian package busybox-static; run `make deps`)")
	}
	if len(missing) == 0 {
		return
	}
	msg := "BuildKit test prerequisites missing:\n  " + strings.Join(missing, "\n  ")
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// TestBuildKit builds, with buildctl and BuildKit's containerd worker on
// fuse-overlayfs, the four builds of issue 17 (RUN writing files, COPY of a
// context, multi-stage COPY --from, deletions with a directory removed and
// re-created over lower content), pushes each image to the registry and
// runs it on fuse-overlayfs, overlayfs and native: the tree inside the
// container must be the same on all three and hold what the Dockerfile
// says. Every exported layer must have gone through our Compare (the
// diff-service default of config/containerd.toml).
func TestBuildKit(t *testing.T) {
	newBuildkitEnv(t, false).buildAll(t, buildTreeSnapshotters)
}

// TestRootlessBuildKit is TestBuildKit as an unprivileged user: containerd
// and buildkitd (--containerd-worker-rootless) inside RootlessKit, as
// rootless_test.go runs containerd.
func TestRootlessBuildKit(t *testing.T) {
	if !isInner(t) {
		newRootlessRun(t, []string{"buildkitd", "buildctl"}, true).run()
		return
	}
	innerSetup(t)
	innerFixture(t)
	newBuildkitEnv(t, true).buildAll(t, buildTreeSnapshotters)
}

// buildAll builds the four builds, pushes each image and checks its tree
// on snapshotters (native among them, see sameTreeEverywhere).
func (e *buildkitEnv) buildAll(t *testing.T, snapshotters []string) {
	for _, bc := range harness.BuildCases(e.base, buildFiles) {
		t.Run(bc.Name, func(t *testing.T) {
			dir := filepath.Join(e.dir, "ctx-"+bc.Name)
			if err := bc.WriteContext(dir); err != nil {
				t.Fatal(err)
			}
			ref := e.fx.registry.Addr + "/built/" + bc.Name + ":1"
			if _, err := e.bk.Build(e.ctx, dir, "type=image,name="+ref+",push=true"); err != nil {
				t.Fatal(err)
			}
			tree := e.sameTreeEverywhere(t, ref, snapshotters)
			checkBuild(t, bc, dir, tree)
		})
	}
	// One layer per RUN or COPY of the final stages: 1 + 1 + 2 + 3; the
	// two ways docs/building.md gives to see which differ ran.
	const layers = 7
	if n := strings.Count(e.c.LogTail(1<<30), "diff written from the upper directory"); n < layers {
		t.Errorf("%d exported layers were written by our Compare, want at least %d (the diff-service default in config/containerd.toml routes exports to the fuse-overlayfs differ)", n, layers)
	}
	m := scrape(t, e.metrics)
	const fast, fallback = `containerd_fuse_overlayfs_compares_total{path="fast",result="ok"}`, `containerd_fuse_overlayfs_compares_total{path="fallback",result="ok"}`
	if m[fast] < layers || m[fallback] != 0 {
		t.Errorf("%s = %v, want at least %d; %s = %v, want 0", fast, m[fast], layers, fallback, m[fallback])
	}
}

// TestNerdctlBuild builds an image as a user types it, in the context
// directory, `nerdctl build --buildkit-host unix://... -t IMG .`, and runs
// it with nerdctl on fuse-overlayfs. In the worker's namespace (buildkit)
// nerdctl has BuildKit store and unpack the image in containerd; in
// another one it loads the image from a tar BuildKit writes.
func TestNerdctlBuild(t *testing.T) {
	e := newBuildkitEnv(t, false)
	dir := filepath.Join(e.dir, "nerdctl-ctx")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	dockerfile := fmt.Sprintf("FROM %s\nCOPY hello.txt /hello.txt\nRUN rm -rf /base/opq && mkdir /base/opq && echo built > /base/opq/only\n", e.base)
	for name, body := range map[string]string{"Dockerfile": dockerfile, "hello.txt": "hello from the context\n"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// The command docs/building.md shows, with this test's buildkitd and
	// image name.
	const img = "example.test/nerdctl-build:1"
	build := strings.Fields(strings.NewReplacer(docBuildkitAddr, e.bk.Address, docNerdctlImage, img).
		Replace(strings.Split(buildingDocBlock(t, "## 3. Building", "sh", 1), "\n")[0]))
	if len(build) < 2 || build[0] != "nerdctl" {
		t.Fatalf("docs/building.md: the nerdctl block does not start with a nerdctl command: %q", build)
	}
	for _, ns := range []string{"buildkit", "nerdctl-build"} {
		t.Run(ns, func(t *testing.T) {
			global := []string{"--snapshotter", sn, "--insecure-registry"}
			out, err := e.c.NerdctlIn(e.ctx, dir, ns, build[1:]...)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("nerdctl build:\n%s", lastLines(out, 8))
			got := e.nerdctl(ns, append(global, "run", "--rm", "--net", "none", img, "cat", "/hello.txt", "/base/opq/only")...)
			if want := "hello from the context\nbuilt\n"; got != want {
				t.Fatalf("nerdctl run %s: got %q, want %q", img, got, want)
			}
			got = e.nerdctl(ns, append(global, "run", "--rm", "--net", "none", img, "ls", "/base/opq")...)
			if got != "only\n" {
				t.Fatalf("/base/opq in the built image holds %q, want only the re-created file", got)
			}
			e.nerdctl(ns, append(global, "rmi", img)...)
		})
	}
}

// sameTreeEverywhere pulls ref for each of snapshotters (native among
// them), dumps the tree seen inside a container on each, fails t unless
// they are equal, and returns the native one (path -> fields).
func (e *buildkitEnv) sameTreeEverywhere(t *testing.T, ref string, snapshotters []string) map[string][]string {
	t.Helper()
	trees := map[string][]string{}
	for _, snapshotter := range snapshotters {
		e.ctr("images", "pull", "--plain-http", "--snapshotter", snapshotter, "--platform", "linux/"+goarch(), ref)
		id := "build-tree-" + snapshotter
		out := e.run("--rm", "--snapshotter", snapshotter, ref, id, images.ProbePath, "treedump", "/")
		trees[snapshotter] = treeLines(out)
	}
	for _, snapshotter := range snapshotters {
		if diff := diffLines(trees["native"], trees[snapshotter]); snapshotter != "native" && diff != "" {
			t.Errorf("tree of %s on %s differs from native (- native, + %s):\n%s", ref, snapshotter, snapshotter, diff)
		}
	}
	e.ctr("images", "rm", "--sync", ref)
	entries := map[string][]string{}
	for _, l := range trees["native"] {
		f := strings.Fields(l)
		entries[strings.Trim(f[0], `"`)] = f[1:]
	}
	return entries
}

// checkBuild asserts what bc's Dockerfile must have produced, so that
// equal trees cannot pass with all of them wrong the same way.
func checkBuild(t *testing.T, bc harness.BuildCase, dir string, tree map[string][]string) {
	t.Helper()
	switch bc.Name {
	case "run":
		assertFileCount(t, tree, "/out/", buildFiles)
	case "copy":
		assertFileCount(t, tree, "/ctx/", buildFiles)
		for _, f := range []string{"d1/f1", "d2/f37", "d3/f100"} {
			data, err := os.ReadFile(filepath.Join(dir, "ctx", f))
			if err != nil {
				t.Fatal(err)
			}
			sum := sha256.Sum256(data)
			assertEntry(t, tree, "/ctx/"+f, "file", "0644", "0", "0", fmt.Sprint(len(data)), hex.EncodeToString(sum[:]))
		}
	case "multistage":
		assertFileCount(t, tree, "/copied/", buildFiles-1)
		assertAbsent(t, tree, "/copied/d1/f1", "/gen")
		assertEntry(t, tree, "/copied/d3/f100", "file", "0644", "0", "0", fmt.Sprint(len("3 100\n")))
	case "delete":
		if got := children(tree, "/base/opq/"); strings.Join(got, " ") != "/base/opq/only" {
			t.Errorf("/base/opq holds %v, want only /base/opq/only (the base's %d files removed with it)", got, harness.OpaqueFiles)
		}
		assertEntry(t, tree, "/base/opq", "dir", "0755")
		assertEntry(t, tree, "/base/opq/only", "file", "0644", "0", "0", "0")
		assertAbsent(t, tree, "/base/keep/k1", "/base/keep/k2", "/base/gone", "/base/gone/sub/f")
		assertEntry(t, tree, "/base/keep/k3", "file", "0644", "0", "0", fmt.Sprint(len("changed\n")))
		assertEntry(t, tree, "/base/keep/newdir/file", "file", "0644", "0", "0", fmt.Sprint(len("new\n")))
		assertFileCount(t, tree, "/base/keep/", harness.KeepFiles-2+1)
	default:
		t.Fatalf("no check for build %q", bc.Name)
	}
}

// children returns the entries directly below dir (which ends in "/").
func children(tree map[string][]string, dir string) []string {
	var out []string
	for p := range tree {
		if rest, ok := strings.CutPrefix(p, dir); ok && rest != "" && !strings.Contains(rest, "/") {
			out = append(out, p)
		}
	}
	return out
}

// assertFileCount checks the number of regular files below dir.
func assertFileCount(t *testing.T, tree map[string][]string, dir string, want int) {
	t.Helper()
	n := 0
	for p, f := range tree {
		if strings.HasPrefix(p, dir) && f[0] == "file" {
			n++
		}
	}
	if n != want {
		t.Errorf("%d files below %s, want %d", n, dir, want)
	}
}

// assertEntry checks the first fields of path's tree line (type, mode,
// uid, gid, size, sha256).
func assertEntry(t *testing.T, tree map[string][]string, path string, want ...string) {
	t.Helper()
	got, ok := tree[path]
	if !ok {
		t.Errorf("%s missing from the built image", path)
		return
	}
	for i, w := range want {
		if i >= len(got) || got[i] != w {
			t.Errorf("%s: got %v, want fields %v", path, got, want)
			return
		}
	}
}

func assertAbsent(t *testing.T, tree map[string][]string, paths ...string) {
	t.Helper()
	for _, p := range paths {
		if _, ok := tree[p]; ok {
			t.Errorf("%s is in the built image; the Dockerfile deleted it", p)
		}
	}
}

// lastLines returns the last n lines of s, for the log.
func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// What docs/building.md shows where the tests use their own.
const (
	docBuildkitAddr  = "unix:///run/buildkit/buildkitd.sock"
	docContainerd    = "/run/containerd/containerd.sock"
	docNerdctlImage  = "app:1"
	docRegistry      = "127.0.0.1:5000"
	docBuildctlImage = "registry.example.com/app:1"
)

// TestBuildingDoc checks that the commands and configuration in
// docs/building.md are the ones the BuildKit tests run: the diff-service
// default of config/containerd.toml, buildkitd's worker flags, its
// registry configuration, and the buildctl command (TestNerdctlBuild runs
// the nerdctl build line itself).
func TestBuildingDoc(t *testing.T) {
	var doc, shipped map[string]any
	if err := toml.Unmarshal([]byte(buildingDocBlock(t, "## 1. containerd", "toml", 0)), &doc); err != nil {
		t.Fatalf("docs/building.md, the diff-service block: %v", err)
	}
	cfgPath, err := harness.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := toml.Unmarshal(data, &shipped); err != nil {
		t.Fatal(err)
	}
	const diffService = "io.containerd.service.v1.diff-service"
	docDefault := fmt.Sprint(doc["plugins"].(map[string]any)[diffService])
	if want := fmt.Sprint(shipped["plugins"].(map[string]any)[diffService]); docDefault != want {
		t.Errorf("docs/building.md shows the diff service as %s, config/containerd.toml has %s", docDefault, want)
	}
	checkWords(t, "buildkitd", buildingDocBlock(t, "## 2. buildkitd", "sh", 0),
		append([]string{"buildkitd"}, harness.WorkerFlags(docContainerd, sn)...))
	if got, want := buildingDocBlock(t, "## 2. buildkitd", "toml", 0), harness.BuildkitConfig(docRegistry); got != want {
		t.Errorf("docs/building.md's buildkitd.toml:\n%s\nthe tests write:\n%s", got, want)
	}
	checkWords(t, "buildctl", buildingDocBlock(t, "## 3. Building", "sh", 0),
		append([]string{"buildctl", "--addr", docBuildkitAddr}, harness.BuildArgs(".", "type=image,name="+docBuildctlImage+",push=true")...))
}

// checkWords compares a shell command of the doc (lines joined at
// trailing backslashes) with want, word by word.
func checkWords(t *testing.T, what, block string, want []string) {
	t.Helper()
	got := strings.Fields(strings.ReplaceAll(block, "\\\n", " "))
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("docs/building.md's %s command:\n  %s\nthe tests run:\n  %s", what, strings.Join(got, " "), strings.Join(want, " "))
	}
}

// buildingDocBlock returns the text of the n-th (from 0) code block of
// language lang in the section of docs/building.md under heading.
// buildingDoc is the BuildKit guide, relative to the repository.
const buildingDoc = "docs/building.md"

func buildingDocBlock(t *testing.T, heading, lang string, n int) string {
	t.Helper()
	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(root, buildingDoc))
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(data), "\n"+heading+"\n")
	if !ok {
		t.Fatalf("docs/building.md has no heading %q", heading)
	}
	if end := strings.Index(section, "\n## "); end >= 0 {
		section = section[:end]
	}
	for i := 0; ; i++ {
		_, after, ok := strings.Cut(section, "```"+lang+"\n")
		if !ok {
			t.Fatalf("docs/building.md: no %s block number %d under %q", lang, n+1, heading)
		}
		block, rest, ok := strings.Cut(after, "```")
		if !ok {
			t.Fatalf("docs/building.md: unterminated %s block under %q", lang, heading)
		}
		if i == n {
			return block
		}
		section = rest
	}
}
