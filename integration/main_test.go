// Package integration holds the end-to-end tests: a containerd built with the
// fuse-overlayfs plugin (bin/containerd), runc, fuse-overlayfs and a
// docker-registry on 127.0.0.1, driven by ctr, nerdctl and crictl. Each test
// starts its own containerd in a private directory and checks at the end
// that no mount or process of that directory is left.
package integration

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fosnap/fuseoverlayfs/integration/internal/harness"
	"github.com/fosnap/fuseoverlayfs/integration/internal/images"
)

const sn = harness.SnapshotterID

// manyLayers is the layer count of the big test image.
const manyLayers = 105

// fixture is shared by all tests of one run: the probe program, a registry
// and the images pushed to it. It is set up on first use, so that a run
// whose prerequisites are missing fails (or skips) in each test, not in
// TestMain.
type fixture struct {
	tmp      string
	probe    []byte
	registry *harness.Registry
	features images.Spec
	many     images.Spec
	pause    images.Spec
	refs     map[string]string // repo -> reference in the registry
}

var (
	fxOnce sync.Once
	fx     *fixture
	fxErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if fx != nil {
		if fx.registry != nil {
			_ = fx.registry.Stop()
		}
		_ = os.RemoveAll(fx.tmp)
	}
	os.Exit(code)
}

// requirePrereqs fails the test when CI=true and something the end-to-end
// tests need is missing, and skips it elsewhere.
func requirePrereqs(t *testing.T) {
	t.Helper()
	missing := harness.Missing()
	if len(missing) == 0 {
		return
	}
	msg := "end-to-end prerequisites missing:\n  " + strings.Join(missing, "\n  ")
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

func getFixture(t *testing.T) *fixture {
	t.Helper()
	fxOnce.Do(func() {
		f := &fixture{refs: map[string]string{}}
		fx = f
		f.tmp, fxErr = os.MkdirTemp("", "fo-e2e-fixture-")
		if fxErr != nil {
			return
		}
		if f.probe, fxErr = harness.BuildProbe(f.tmp); fxErr != nil {
			return
		}
		if f.registry, fxErr = harness.StartRegistry(filepath.Join(f.tmp, "registry")); fxErr != nil {
			return
		}
		f.features = images.Features(f.probe)
		f.many = images.Many(f.probe, manyLayers)
		f.pause = images.Pause(f.probe)
		for _, spec := range []images.Spec{f.features, f.many, f.pause} {
			ref, err := images.Push(f.registry.Addr, spec)
			if err != nil {
				fxErr = err
				return
			}
			f.refs[spec.Repo] = ref
		}
	})
	if fxErr != nil {
		t.Fatalf("test fixture: %v", fxErr)
	}
	return fx
}

// env is one test's private containerd.
type env struct {
	t   *testing.T
	fx  *fixture
	dir string
	c   *harness.Containerd
	ctx context.Context
}

type envOption func(*harness.Options)

func newEnv(t *testing.T, opts ...envOption) *env {
	t.Helper()
	requirePrereqs(t)
	f := getFixture(t)
	// A short directory name: fuse-overlayfs gets one lowerdir path per
	// layer on its command line.
	dir, err := os.MkdirTemp("", "fo-")
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, fx: f, dir: dir, ctx: context.Background()}
	// Registered first, so it runs last: after containerd has stopped,
	// nothing of dir may be left.
	t.Cleanup(func() { e.checkNothingLeft() })
	o := harness.Options{Dir: dir, Registry: f.registry.Addr}
	for _, opt := range opts {
		opt(&o)
	}
	c, err := harness.StartContainerd(e.ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	e.c = c
	t.Logf("containerd pid %d, dir %s", c.PID(), dir)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("containerd log tail:\n%s", e.c.LogTail(60))
		}
		if e.c.Running() {
			removed, err := e.c.Sweep(e.ctx)
			if err != nil {
				t.Errorf("sweep: %v", err)
			}
			if len(removed) > 0 && !t.Failed() {
				t.Errorf("test left tasks or containers behind: %v", removed)
			}
		}
		if err := e.c.Stop(); err != nil {
			t.Error(err)
		}
	})
	return e
}

func (e *env) checkNothingLeft() {
	t := e.t
	left, err := harness.WaitNoLeftovers(e.dir, 15*time.Second)
	if err != nil {
		t.Errorf("looking for leftovers: %v", err)
	}
	if !left.Empty() {
		t.Errorf("left behind after the test (cleaning up now):\n%s", left)
		if err := harness.CleanLeftovers(left); err != nil {
			t.Error(err)
		}
	}
	if err := os.RemoveAll(e.dir); err != nil {
		t.Errorf("remove %s: %v", e.dir, err)
	}
}

// ctr runs ctr and fails the test on error.
func (e *env) ctr(args ...string) string {
	e.t.Helper()
	out, err := e.c.Ctr(e.ctx, args...)
	if err != nil {
		e.t.Fatal(err)
	}
	return out
}

func (e *env) nerdctl(ns string, args ...string) string {
	e.t.Helper()
	out, err := e.c.Nerdctl(e.ctx, ns, args...)
	if err != nil {
		e.t.Fatal(err)
	}
	return out
}

func (e *env) crictl(args ...string) string {
	e.t.Helper()
	out, err := e.c.Crictl(e.ctx, args...)
	if err != nil {
		e.t.Fatal(err)
	}
	return out
}

// snapshot is one line of `ctr snapshots ls`.
type snapshot struct{ Key, Parent, Kind string }

func (e *env) snapshots(ns, snapshotter string) map[string]snapshot {
	e.t.Helper()
	out := e.ctr("-n", ns, "snapshots", "--snapshotter", snapshotter, "ls")
	snaps := map[string]snapshot{}
	for i, line := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(line)
		if i == 0 || len(f) < 2 {
			continue // header
		}
		s := snapshot{Key: f[0], Kind: f[len(f)-1]}
		if len(f) == 3 {
			s.Parent = f[1]
		}
		snaps[s.Key] = s
	}
	return snaps
}

// chain follows the parents of key and returns the kinds, key first.
func (e *env) chain(ns, snapshotter, key string) []string {
	e.t.Helper()
	snaps := e.snapshots(ns, snapshotter)
	var kinds []string
	for k := key; k != ""; {
		s, ok := snaps[k]
		if !ok {
			e.t.Fatalf("snapshot %q (in the chain of %q) not listed by ctr snapshots ls: %v", k, key, snaps)
		}
		kinds = append(kinds, s.Kind)
		k = s.Parent
		if len(kinds) > len(snaps) {
			e.t.Fatalf("snapshot chain of %q loops", key)
		}
	}
	return kinds
}

// assertChain checks that key is an active snapshot over one committed
// snapshot per image layer.
func (e *env) assertChain(ns, snapshotter, key string, layers int) {
	e.t.Helper()
	kinds := e.chain(ns, snapshotter, key)
	want := []string{"Active"}
	for range layers {
		want = append(want, "Committed")
	}
	if strings.Join(kinds, ",") != strings.Join(want, ",") {
		e.t.Fatalf("snapshot chain of %q: got %v, want %v", key, kinds, want)
	}
}

// upperdir returns the upper directory of an active fuse-overlayfs snapshot,
// as `ctr snapshots mounts` reports it.
func (e *env) upperdir(ns, key string) string {
	e.t.Helper()
	out := e.ctr("-n", ns, "snapshots", "--snapshotter", sn, "mounts", "/mnt", key)
	for _, field := range strings.FieldsFunc(out, func(r rune) bool { return r == ' ' || r == ',' || r == '\n' }) {
		if v, ok := strings.CutPrefix(field, "upperdir="); ok {
			return v
		}
	}
	e.t.Fatalf("no upperdir in the mounts of %s: %s", key, out)
	return ""
}

// fuseMounts lists the fuse-overlayfs mounts below this test's directory.
func (e *env) fuseMounts() []harness.Mount {
	e.t.Helper()
	mounts, err := harness.Mounts()
	if err != nil {
		e.t.Fatal(err)
	}
	var out []harness.Mount
	for _, m := range mounts {
		if strings.HasPrefix(m.Point, e.dir+"/") && strings.HasPrefix(m.FSType, "fuse") {
			out = append(out, m)
		}
	}
	return out
}

// waitFuseMount waits until a fuse-overlayfs mount whose mount point
// contains id exists.
func (e *env) waitFuseMount(id string) harness.Mount {
	e.t.Helper()
	var found harness.Mount
	err := harness.Poll(30*time.Second, 100*time.Millisecond, func() error {
		for _, m := range e.fuseMounts() {
			if strings.Contains(m.Point, id) {
				found = m
				return nil
			}
		}
		return fmt.Errorf("no FUSE mount for %s among %v", id, e.fuseMounts())
	})
	if err != nil {
		e.t.Fatal(err)
	}
	return found
}

// assertContains fails unless out holds every one of wants.
func assertContains(t *testing.T, what, out string, wants ...string) {
	t.Helper()
	for _, w := range wants {
		if !strings.Contains(out, w) {
			t.Fatalf("%s: %q not found in:\n%s", what, w, out)
		}
	}
}

// featuresOutput is what the features image's default command prints.
const featuresOutput = "from layer 1\nfrom layer 3\nfrom layer 5\nfrom layer 6\n"
