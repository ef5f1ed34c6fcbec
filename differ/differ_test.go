package differ

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	fuseoverlayfs "github.com/fosnap/fuseoverlayfs"
	"github.com/fosnap/fuseoverlayfs/internal/testutil"
	"github.com/fosnap/fuseoverlayfs/internal/testutil/tartest"
)

// layerTar is the uncompressed tar of a layer of entries.
func layerTar(t *testing.T, ents ...tartest.Entry) []byte {
	t.Helper()
	b, err := tartest.Layer(ents).Tar()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// labels keeps content labels in memory (the walking differ sets one).
type labels map[digest.Digest]map[string]string

func (l labels) Get(d digest.Digest) (map[string]string, error) { return l[d], nil }
func (l labels) Set(d digest.Digest, m map[string]string) error { l[d] = m; return nil }
func (l labels) Update(d digest.Digest, m map[string]string) (map[string]string, error) {
	if l[d] == nil {
		l[d] = map[string]string{}
	}
	for k, v := range m {
		if v == "" {
			delete(l[d], k)
		} else {
			l[d][k] = v
		}
	}
	return l[d], nil
}

type env struct {
	ctx   context.Context
	root  string
	sn    snapshots.Snapshotter
	store content.Store
}

func newEnv(t *testing.T) *env {
	t.Helper()
	dir := t.TempDir()
	root := filepath.Join(dir, "root")
	sn, err := fuseoverlayfs.NewSnapshotter(root)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sn.Close() })
	store, err := local.NewLabeledStore(filepath.Join(dir, "content"), labels{})
	if err != nil {
		t.Fatal(err)
	}
	return &env{ctx: namespaces.WithNamespace(context.Background(), "test"), root: root, sn: sn, store: store}
}

// kinds lets a differ ask e's snapshotter which snapshots are active, as
// the plugin and the gRPC server do.
func (e *env) kinds() Opt {
	return WithSnapshotKinds(e.root, e.sn.(fuseoverlayfs.KindLookup).KindByID)
}

// differ is a Differ for e's root that knows its snapshots' kinds.
func (e *env) differ(opts ...Opt) *Differ {
	return New(e.store, []string{e.root}, append(opts, e.kinds())...)
}

// blob stores tarData gzip-compressed and returns its descriptor and the
// digest of the uncompressed tar (the diff ID).
func (e *env) blob(t *testing.T, tarData []byte) (ocispec.Descriptor, digest.Digest) {
	t.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	if _, err := zw.Write(tarData); err != nil {
		t.Fatal(err)
	}
	// Trailing data after the tar's end must count in the digest too.
	if _, err := zw.Write(make([]byte, 512)); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromBytes(buf.Bytes()), Size: int64(buf.Len())}
	if err := content.WriteBlob(e.ctx, e.store, desc.Digest.String(), bytes.NewReader(buf.Bytes()), desc); err != nil {
		t.Fatal(err)
	}
	return desc, digest.FromBytes(append(append([]byte{}, tarData...), make([]byte, 512)...))
}

// unpack prepares key on parent, applies the layer and commits it as name
// (with WithParent(rebase) if rebase is set, as parallel unpack does).
func (e *env) unpack(t *testing.T, dif *Differ, name, parent, rebase string, tarData []byte, opts ...diff.ApplyOpt) []mount.Mount {
	t.Helper()
	desc, diffID := e.blob(t, tarData)
	mounts, err := e.sn.Prepare(e.ctx, name+"-extract", parent)
	if err != nil {
		t.Fatal(err)
	}
	got, err := dif.Apply(e.ctx, desc, mounts, opts...)
	if err != nil {
		t.Fatalf("apply %s: %v", name, err)
	}
	if got.Digest != diffID || got.MediaType != ocispec.MediaTypeImageLayer {
		t.Fatalf("apply %s returned %v, want digest %s", name, got, diffID)
	}
	var copts []snapshots.Opt
	if rebase != "" {
		copts = append(copts, snapshots.WithParent(rebase))
	}
	if err := e.sn.Commit(e.ctx, name, name+"-extract", copts...); err != nil {
		t.Fatalf("commit %s: %v", name, err)
	}
	return mounts
}

// view mounts a view of name through the snapshotter's real mounts.
func (e *env) view(t *testing.T, name string) string {
	t.Helper()
	mounts, err := e.sn.View(e.ctx, name+"-view", name)
	if err != nil {
		t.Fatal(err)
	}
	target := t.TempDir()
	if err := mount.All(mounts, target); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := mount.UnmountAll(target, 0); err != nil {
			t.Error(err)
		}
	})
	return target
}

func readFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func mustNotExist(t *testing.T, p string) {
	t.Helper()
	if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s should not be seen: %v", p, err)
	}
}

var (
	base = []tartest.Entry{tartest.Dir("bin", 0o755), tartest.File("bin/tool", 0o644, "tool"), tartest.Dir("etc", 0o755),
		tartest.File("etc/a", 0o644, "a"), tartest.File("etc/b", 0o644, "b"), tartest.Dir("data", 0o755), tartest.File("data/old", 0o644, "o")}
	upper = []tartest.Entry{tartest.Hardlink("bin/tool2", "bin/tool"), tartest.Whiteout("etc/a"), tartest.Dir("data", 0o755),
		tartest.Opaque("data"), tartest.File("data/new", 0o644, "n"), tartest.Whiteout("gone")}
)

func checkStack(t *testing.T, mnt string) {
	t.Helper()
	if got := readFile(t, filepath.Join(mnt, "bin/tool2")); got != "tool" {
		t.Errorf("hard link across layers reads %q", got)
	}
	var a, b unix.Stat_t
	if err := unix.Stat(filepath.Join(mnt, "bin/tool"), &a); err != nil {
		t.Fatal(err)
	}
	if err := unix.Stat(filepath.Join(mnt, "bin/tool2"), &b); err != nil {
		t.Fatal(err)
	}
	if a.Ino != b.Ino {
		t.Errorf("bin/tool and bin/tool2 are not one inode")
	}
	mustNotExist(t, filepath.Join(mnt, "etc/a"))
	mustNotExist(t, filepath.Join(mnt, "data/old"))
	if got := readFile(t, filepath.Join(mnt, "etc/b")); got != "b" {
		t.Errorf("etc/b reads %q", got)
	}
	entries, err := os.ReadDir(filepath.Join(mnt, "data"))
	if err != nil || len(entries) != 1 || entries[0].Name() != "new" {
		t.Errorf("data holds %v (%v), want only new", entries, err)
	}
	mustNotExist(t, filepath.Join(mnt, "data/old"))
}

// TestApplySequential applies a base layer through its bind mount and an
// upper one through its fuse-overlayfs mount, as containerd's sequential
// unpack does, and checks the layer directory and a real mount of the
// result.
func TestApplySequential(t *testing.T) {
	testutil.RequireFUSE(t)
	t.Cleanup(func() { testutil.RequireNoLeftovers(t, "TestApplySequential") })
	for _, unpriv := range []bool{false, true} {
		t.Run(map[bool]string{false: "privileged", true: "unprivileged"}[unpriv], func(t *testing.T) {
			e := newEnv(t)
			var opts []Opt
			if unpriv {
				opts = append(opts, WithUnprivilegedForms())
			}
			dif := e.differ(opts...)
			var progress []int64
			m := e.unpack(t, dif, "base", "", "", layerTar(t, base...), diff.WithSyncFs(true),
				diff.WithProgress(func(_ ocispec.Descriptor, n int64) { progress = append(progress, n) }))
			if m[0].Type != "bind" {
				t.Fatalf("base layer mount %v", m)
			}
			if len(progress) < 2 || progress[0] != 0 {
				t.Errorf("progress reports %v", progress)
			}
			m = e.unpack(t, dif, "upper", "base", "", layerTar(t, upper...))
			if m[0].Type != fuseoverlayfs.MountType {
				t.Fatalf("upper layer mount %v", m)
			}
			upperDir := strings.TrimPrefix(m[0].Options[1], "upperdir=")
			var st unix.Stat_t
			err := unix.Lstat(filepath.Join(upperDir, "etc/a"), &st)
			if unpriv {
				if _, err := os.Lstat(filepath.Join(upperDir, "etc/.wh.a")); err != nil {
					t.Errorf("want the .wh.a file form: %v", err)
				}
			} else if err != nil || st.Mode&unix.S_IFMT != unix.S_IFCHR || st.Rdev != 0 {
				t.Errorf("want a 0/0 device whiteout: %v %o", err, st.Mode)
			}
			checkStack(t, e.view(t, "upper"))
		})
	}
}

// TestApplyParallel prepares every layer without parent (bind mounts),
// applies them, then commits with WithParent, as containerd's parallel
// unpack does with the rebase capability.
func TestApplyParallel(t *testing.T) {
	testutil.RequireFUSE(t)
	t.Cleanup(func() { testutil.RequireNoLeftovers(t, "TestApplyParallel") })
	e := newEnv(t)
	dif := e.differ()
	m := e.unpack(t, dif, "base", "", "", layerTar(t, base...))
	if m[0].Type != "bind" {
		t.Fatal(m)
	}
	m = e.unpack(t, dif, "upper", "", "base", layerTar(t, upper...))
	if m[0].Type != "bind" {
		t.Fatalf("parallel layer mount %v", m)
	}
	info, err := e.sn.Stat(e.ctx, "upper")
	if err != nil || info.Parent != "base" {
		t.Fatalf("rebased: %+v %v", info, err)
	}
	checkStack(t, e.view(t, "upper"))
}

// TestForeignMountsDeclined: anything that is not this snapshotter's gets
// ErrNotImplemented, so the diff service moves on to the next differ. (A
// mount that would write elsewhere inside the root is refused instead:
// TestApplyOnlyIntoActive.)
func TestForeignMountsDeclined(t *testing.T) {
	e := newEnv(t)
	dif := e.differ()
	mounts, err := e.sn.Prepare(e.ctx, "a", "")
	if err != nil {
		t.Fatal(err)
	}
	if err := e.sn.Commit(e.ctx, "c", "a"); err != nil {
		t.Fatal(err)
	}
	own := mounts[0].Source
	ofs, err := e.sn.Prepare(e.ctx, "b", "c")
	if err != nil {
		t.Fatal(err)
	}
	opt := func(prefix string) string {
		for _, o := range ofs[0].Options {
			if strings.HasPrefix(o, prefix) {
				return o
			}
		}
		t.Fatalf("no %s option in %v", prefix, ofs[0].Options)
		return ""
	}
	other := t.TempDir()
	fake := filepath.Join(other, "snapshots", "1", "fs")
	if err := os.MkdirAll(fake, 0o755); err != nil {
		t.Fatal(err)
	}
	desc, _ := e.blob(t, layerTar(t, tartest.File("x", 0o644, "x")))
	for name, m := range map[string][]mount.Mount{
		"overlay":             {{Type: "overlay", Source: "overlay", Options: []string{"lowerdir=" + own, "upperdir=" + other, "workdir=" + other}}},
		"tmpfs":               {{Type: "tmpfs", Source: "tmpfs"}},
		"bind elsewhere":      {{Type: "bind", Source: other, Options: []string{"rw", "rbind"}}},
		"bind other root":     {{Type: "bind", Source: fake, Options: []string{"rw", "rbind"}}},
		"read-only bind":      {{Type: "bind", Source: own, Options: []string{"ro", "rbind"}}},
		"two mounts":          {mounts[0], mounts[0]},
		"no mounts":           nil,
		"fuse upper outside":  {{Type: fuseoverlayfs.MountType, Source: "overlay", Options: []string{opt("lowerdir="), "upperdir=" + fake, "workdir=" + other}}},
		"fuse lower outside":  {{Type: fuseoverlayfs.MountType, Source: "overlay", Options: []string{"lowerdir=" + other, opt("upperdir="), opt("workdir=")}}},
		"fuse read-only view": {{Type: fuseoverlayfs.MountType, Source: "overlay", Options: []string{opt("lowerdir=")}}},
		"fuse id-mapped":      {{Type: fuseoverlayfs.MountType, Source: "overlay", Options: append(append([]string{}, ofs[0].Options...), "uidmapping=0:1000:1", "gidmapping=0:1000:1")}},
	} {
		if _, err := dif.Apply(e.ctx, desc, m); !errdefs.IsNotImplemented(err) {
			t.Errorf("%s: got %v, want ErrNotImplemented", name, err)
		}
	}
	// Nothing was written anywhere.
	for _, dir := range []string{other, own} {
		if _, err := os.Lstat(filepath.Join(dir, "x")); err == nil {
			t.Errorf("layer written into %s", dir)
		}
	}
	// A differ without roots (snapshotter not loaded) declines ours too.
	if _, err := New(e.store, nil).Apply(e.ctx, desc, ofs); !errdefs.IsNotImplemented(err) {
		t.Errorf("rootless differ: %v", err)
	}
}

// TestSmuggledMountsRefused: a mount of ours whose options the mount
// helper would read as other options (joined with commas, the last upperdir
// wins), or with options the snapshotter never writes, is refused as
// invalid by Apply and Compare, and nothing is written anywhere.
func TestSmuggledMountsRefused(t *testing.T) {
	e := newEnv(t)
	dif := e.differ()
	if _, err := e.sn.Prepare(e.ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	if err := e.sn.Commit(e.ctx, "c", "a"); err != nil {
		t.Fatal(err)
	}
	ofs, err := e.sn.Prepare(e.ctx, "b", "c")
	if err != nil {
		t.Fatal(err)
	}
	other := t.TempDir()
	with := func(opts ...string) []mount.Mount {
		m := ofs[0]
		m.Options = append(append([]string{}, m.Options...), opts...)
		return []mount.Mount{m}
	}
	desc, _ := e.blob(t, layerTar(t, tartest.File("x", 0o644, "x")))
	for name, m := range map[string][]mount.Mount{
		"smuggled in uidmapping": with("uidmapping=0:0:65536,upperdir=" + other + ",workdir=" + other),
		"smuggled in an extra":   with("noacl,upperdir=" + other),
		"repeated upperdir":      with("upperdir=" + other),
		"plugin":                 with("plugins=" + filepath.Join(other, "p.so")),
	} {
		if _, err := dif.Apply(e.ctx, desc, m); !errdefs.IsInvalidArgument(err) {
			t.Errorf("apply %s: got %v, want ErrInvalidArgument", name, err)
		}
		if _, err := dif.Compare(e.ctx, nil, m); !errdefs.IsInvalidArgument(err) {
			t.Errorf("compare %s: got %v, want ErrInvalidArgument", name, err)
		}
	}
	if entries, err := os.ReadDir(other); err != nil || len(entries) != 0 {
		t.Errorf("written outside the root: %v %v", entries, err)
	}
	if _, err := os.Lstat(filepath.Join(upperOf(t, ofs), "x")); err == nil {
		t.Error("layer written into the snapshot")
	}
}

// TestCompareIsWalking: the comparer is containerd's walking differ.
func TestCompareIsWalking(t *testing.T) {
	testutil.RequireRoot(t)
	e := newEnv(t)
	dif := e.differ()
	lower, upper := t.TempDir(), t.TempDir()
	if err := os.WriteFile(filepath.Join(upper, "new"), []byte("n"), 0o644); err != nil {
		t.Fatal(err)
	}
	desc, err := dif.Compare(e.ctx,
		[]mount.Mount{{Type: "bind", Source: lower, Options: []string{"ro", "rbind"}}},
		[]mount.Mount{{Type: "bind", Source: upper, Options: []string{"ro", "rbind"}}})
	if err != nil {
		t.Fatal(err)
	}
	ra, err := e.store.ReaderAt(e.ctx, desc)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ra.Close() }()
	zr, err := gzip.NewReader(content.NewReader(ra))
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(zr)
	hdr, err := tr.Next()
	if err != nil || hdr.Name != "new" {
		t.Fatalf("diff holds %v %v, want new", hdr, err)
	}
}

// TestApplierOnly: a Differ made by NewApplier applies from a provider
// (here a read-only one) and declines Compare with ErrNotImplemented, so the
// diff service goes on to containerd's walking differ.
func TestApplierOnly(t *testing.T) {
	testutil.RequireFUSE(t)
	t.Cleanup(func() { testutil.RequireNoLeftovers(t, "TestApplierOnly") })
	e := newEnv(t)
	dif := NewApplier(readOnly{e.store}, []string{e.root}, e.kinds())
	e.unpack(t, dif, "base", "", "", layerTar(t, base...))
	e.unpack(t, dif, "upper", "base", "", layerTar(t, upper...))
	checkStack(t, e.view(t, "upper"))
	dir := t.TempDir()
	m := []mount.Mount{{Type: "bind", Source: dir, Options: []string{"ro", "rbind"}}}
	if _, err := dif.Compare(e.ctx, m, m); !errdefs.IsNotImplemented(err) {
		t.Fatalf("Compare: got %v, want ErrNotImplemented", err)
	}
}

// readOnly hides everything of a store but reading.
type readOnly struct{ p content.Provider }

func (r readOnly) ReaderAt(ctx context.Context, desc ocispec.Descriptor) (content.ReaderAt, error) {
	return r.p.ReaderAt(ctx, desc)
}
