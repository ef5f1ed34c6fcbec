package main

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	diffapi "github.com/containerd/containerd/api/services/diff/v1"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/diff"
	diffproxy "github.com/containerd/containerd/v2/core/diff/proxy"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	fuseoverlayfs "github.com/fosnap/fuseoverlayfs"
	"github.com/fosnap/fuseoverlayfs/internal/testutil"
	"github.com/fosnap/fuseoverlayfs/internal/testutil/tartest"
)

// differClient is what containerd's diff proxy plugin is.
type differClient interface {
	diff.Applier
	diff.Comparer
}

// putLayer writes a gzip-compressed layer of entries into a containerd
// content directory (blobs/sha256/<hex>, as containerd keeps it) and
// returns its descriptor and diff ID.
func putLayer(t *testing.T, contentRoot string, entries ...tartest.Entry) (ocispec.Descriptor, digest.Digest) {
	t.Helper()
	tarData, err := tartest.Layer(entries).Tar()
	if err != nil {
		t.Fatal(err)
	}
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	if _, err := zw.Write(tarData); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromBytes(gz.Bytes()), Size: int64(gz.Len())}
	p := filepath.Join(contentRoot, "blobs", "sha256", desc.Digest.Encoded())
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, gz.Bytes(), 0o444); err != nil {
		t.Fatal(err)
	}
	return desc, digest.FromBytes(tarData)
}

func TestContentDirReader(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	desc, _ := putLayer(t, dir, tartest.File("f", 0o644, "x"))
	c := contentDir{dir}
	ra, err := c.ReaderAt(ctx, desc)
	if err != nil {
		t.Fatal(err)
	}
	data, err := content.ReadBlob(ctx, c, desc)
	if err != nil || digest.FromBytes(data) != desc.Digest || ra.Size() != desc.Size {
		t.Fatalf("read back %d bytes (%v), size %d, want the blob", len(data), err, ra.Size())
	}
	if err := ra.Close(); err != nil {
		t.Fatal(err)
	}

	missing := ocispec.Descriptor{Digest: digest.FromString("not there"), Size: 9}
	_, err = c.ReaderAt(ctx, missing)
	wantPath := filepath.Join(dir, "blobs", "sha256", missing.Digest.Encoded())
	if !errdefs.IsNotFound(err) || !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), missing.Digest.String()) || !strings.Contains(err.Error(), wantPath) ||
		!strings.Contains(err.Error(), "content_dir "+dir) || !strings.Contains(err.Error(), "--content-dir") {
		t.Errorf("missing blob: got %v, want not found naming %s, %s, the directory and --content-dir", err, missing.Digest, wantPath)
	}
	// The whole directory missing is said so.
	gone := filepath.Join(dir, "gone")
	_, err = contentDir{gone}.ReaderAt(ctx, missing)
	if !errdefs.IsNotFound(err) || !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), "the directory "+gone+" does not exist") || !strings.Contains(err.Error(), "--content-dir") {
		t.Errorf("missing content directory: got %v, want not found saying %s does not exist", err, gone)
	}
	// Another size than the descriptor's.
	wrong := desc
	wrong.Size++
	if _, err := c.ReaderAt(ctx, wrong); !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "bytes") {
		t.Errorf("size mismatch: got %v", err)
	}
	// A digest that is not one never becomes a path.
	for _, bad := range []digest.Digest{"sha256:../../etc/passwd", "", "md5:abc"} {
		if _, err := c.ReaderAt(ctx, ocispec.Descriptor{Digest: bad}); !errdefs.IsInvalidArgument(err) {
			t.Errorf("digest %q: got %v, want invalid argument", bad, err)
		}
	}
}

// TestUnreadableBlob: a blob the server's user cannot read is an error of
// class not found naming the digest and the path, keeping the permission
// error as its cause.
func TestUnreadableBlob(t *testing.T) {
	dir := t.TempDir()
	desc, _ := putLayer(t, dir, tartest.File("f", 0o644, "x"))
	p := filepath.Join(dir, "blobs", "sha256", desc.Digest.Encoded())
	if err := os.Chmod(p, 0); err != nil {
		t.Fatal(err)
	}
	var err error
	// Root reads any file: as root, read as nobody.
	if serr := asUser(65534, func() { _, err = contentDir{dir}.ReaderAt(context.Background(), desc) }); serr != nil {
		t.Fatal(serr)
	}
	if !errdefs.IsNotFound(err) || !errors.Is(err, os.ErrPermission) || !strings.Contains(err.Error(), p) || !strings.Contains(err.Error(), desc.Digest.String()) {
		t.Fatalf("unreadable blob: got %v, want not found naming %s and %s, caused by permission denied", err, desc.Digest, p)
	}
}

// asUser runs fn with effective uid uid when this process is root: on a
// thread of its own, changed with the raw system call (Go's Setresuid would
// change every thread) and never handed back, so it ends with fn.
func asUser(uid int, fn func()) error {
	if os.Geteuid() != 0 {
		fn()
		return nil
	}
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // not unlocked: the thread exits with this goroutine
		if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, ^uintptr(0), uintptr(uid), ^uintptr(0)); e != 0 {
			done <- fmt.Errorf("setresuid: %w", e)
			return
		}
		fn()
		done <- nil
	}()
	return <-done
}

// TestDefaultContentDir: root's containerd keeps content under
// /var/lib/containerd; a rootless one, as nerdctl sets it up, under
// $XDG_DATA_HOME/containerd or ~/.local/share/containerd.
func TestDefaultContentDir(t *testing.T) {
	env := func(kv map[string]string) func(string) string { return func(k string) string { return kv[k] } }
	for _, tc := range []struct {
		name     string
		env      map[string]string
		rootless bool
		want     string
	}{
		{"root", map[string]string{"HOME": "/root"}, false, "/var/lib/containerd/io.containerd.content.v1.content"},
		{"rootless home", map[string]string{"HOME": "/home/u"}, true, "/home/u/.local/share/containerd/io.containerd.content.v1.content"},
		{"rootless xdg", map[string]string{"HOME": "/home/u", "XDG_DATA_HOME": "/data/u"}, true, "/data/u/containerd/io.containerd.content.v1.content"},
		{"relative xdg ignored", map[string]string{"HOME": "/home/u", "XDG_DATA_HOME": "data"}, true, "/home/u/.local/share/containerd/io.containerd.content.v1.content"},
		{"no home", map[string]string{}, true, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := defaultContentDir(env(tc.env), tc.rootless)
			if tc.want == "" {
				if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "--content-dir") {
					t.Fatalf("got %q, %v; want an invalid-argument error pointing at --content-dir", got, err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}

func TestResolveContentDir(t *testing.T) {
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "c.toml")
	if err := os.WriteFile(cfgPath, []byte("content_dir = '/from/config'\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("HOME", "/home/u")
	t.Setenv("XDG_DATA_HOME", "")
	def, err := defaultContentDir(os.Getenv, runningRootless())
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		o    options
		want string
		err  string
	}{
		{name: "flag", o: options{contentDir: "/c"}, want: "/c"},
		{name: "relative flag made absolute", o: options{contentDir: "rel"}, want: filepath.Join(mustGetwd(t), "rel")},
		{name: "config", o: options{configPath: cfgPath}, want: "/from/config"},
		{name: "same in both", o: options{contentDir: "/from/config/", configPath: cfgPath}, want: "/from/config"},
		{name: "differ", o: options{contentDir: "/other", configPath: cfgPath}, err: "differ"},
		{name: "default", o: options{}, want: def},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := tc.o
			o.socket, o.root = "/s.sock", "/r"
			cfg, err := resolve(o)
			if tc.err != "" {
				if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want an invalid-argument one containing %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if cfg.ContentDir != tc.want {
				t.Errorf("content dir %q, want %q", cfg.ContentDir, tc.want)
			}
		})
	}
}

// TestDiffOverGRPC drives the server's diff API through containerd's own
// diff proxy client, as containerd does with a `type = "diff"` proxy
// plugin: layers of our snapshots are applied directly (base through its
// bind mount, the next one onto its parents), the result reads right
// through a real mount; foreign mounts and Compare come back as
// ErrNotImplemented (what the diff service needs to go on to its next
// differ); a missing blob is not found, naming digest and path. SIGHUP is
// logged and does not stop the server.
func TestDiffOverGRPC(t *testing.T) {
	testutil.RequireFUSE(t)
	dir := shortDir(t)
	root := filepath.Join(dir, "root")
	contentRoot := filepath.Join(dir, "content")
	socket := filepath.Join(dir, "run", "s.sock")
	srv := start(t, nil, socket, root, "--content-dir", contentRoot, "--log-level", "debug")
	sn, conn, err := srv.serving(socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	d := diffproxy.NewDiffApplier(diffapi.NewDiffClient(conn)).(differClient)
	ctx := namespaces.WithNamespace(context.Background(), "test")

	baseDesc, baseID := putLayer(t, contentRoot,
		tartest.Dir("etc", 0o755), tartest.File("etc/a", 0o644, "a"), tartest.File("etc/b", 0o644, "b"))
	upperDesc, upperID := putLayer(t, contentRoot,
		tartest.Dir("etc", 0o755), tartest.Whiteout("etc/a"), tartest.File("etc/c", 0o644, "c"))

	apply := func(key, parent string, desc ocispec.Descriptor, want digest.Digest) []mount.Mount {
		t.Helper()
		mounts, err := sn.Prepare(ctx, key+"-extract", parent)
		if err != nil {
			t.Fatal(err)
		}
		got, err := d.Apply(ctx, desc, mounts)
		if err != nil {
			t.Fatalf("apply %s: %v\n%s", key, err, srv.out)
		}
		if got.Digest != want {
			t.Fatalf("apply %s: diff %s, want %s", key, got.Digest, want)
		}
		if err := sn.Commit(ctx, key, key+"-extract"); err != nil {
			t.Fatal(err)
		}
		return mounts
	}
	if m := apply("base", "", baseDesc, baseID); m[0].Type != "bind" {
		t.Fatalf("base mounts %v", m)
	}
	if m := apply("upper", "base", upperDesc, upperID); m[0].Type != fuseoverlayfs.MountType {
		t.Fatalf("upper mounts %v", m)
	}
	view, err := sn.View(ctx, "view", "upper")
	if err != nil {
		t.Fatal(err)
	}
	withMount(t, view, func(mp string) {
		for f, want := range map[string]string{"etc/b": "b", "etc/c": "c"} {
			if got, err := os.ReadFile(filepath.Join(mp, f)); err != nil || string(got) != want {
				t.Errorf("%s: %q, %v", f, got, err)
			}
		}
		if _, err := os.Lstat(filepath.Join(mp, "etc/a")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("etc/a deleted by the upper layer: %v", err)
		}
	})
	if n := strings.Count(srv.out.String(), `level=info msg="layer applied directly"`); n != 2 {
		t.Errorf("the log shows %d direct applies, want 2:\n%s", n, srv.out)
	}
	if !strings.Contains(srv.out.String(), "md.containerd-namespace=test") {
		t.Errorf("the log does not show the call's metadata:\n%s", srv.out)
	}

	// An ID-mapped snapshot of ours: written through its mount (the
	// mapping applies), by containerd's applier in the server.
	mapping := snapshots.WithLabels(map[string]string{snapshots.LabelSnapshotUIDMapping: "0:1000:65536", snapshots.LabelSnapshotGIDMapping: "0:1000:65536"})
	mapped, err := sn.Prepare(ctx, "mapped", "base", mapping)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := d.Apply(ctx, upperDesc, mapped); err != nil || got.Digest != upperID {
		t.Fatalf("apply onto an ID-mapped snapshot: %v, %v\n%s", got.Digest, err, srv.out)
	}
	// The server logs before it answers, but its output reaches srv.out
	// through a pipe: wait for the line.
	if err := srv.waitLog(`level=info msg="layer applied through the mount"`); err != nil {
		t.Errorf("%v:\n%s", err, srv.out)
	}

	// Not ours: another directory, a foreign type.
	other := t.TempDir()
	for _, m := range [][]mount.Mount{
		{{Type: "bind", Source: other, Options: []string{"rw", "rbind"}}},
		{{Type: "overlay", Source: "overlay", Options: []string{"lowerdir=" + other, "upperdir=" + other, "workdir=" + other}}},
	} {
		if _, err := d.Apply(ctx, baseDesc, m); !errdefs.IsNotImplemented(err) {
			t.Errorf("foreign mount %v: got %v, want ErrNotImplemented", m, err)
		}
	}
	if _, err := d.Compare(ctx, view, view); !errdefs.IsNotImplemented(err) {
		t.Errorf("Compare: got %v, want ErrNotImplemented", err)
	}

	// A blob that is not in the content directory.
	mounts, err := sn.Prepare(ctx, "missing-extract", "")
	if err != nil {
		t.Fatal(err)
	}
	missing := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromString("absent"), Size: 10}
	_, err = d.Apply(ctx, missing, mounts)
	if !errdefs.IsNotFound(err) || !strings.Contains(err.Error(), missing.Digest.String()) || !strings.Contains(err.Error(), filepath.Join(contentRoot, "blobs", "sha256")) {
		t.Errorf("missing blob: got %v, want not found naming the digest and where it looked", err)
	}

	if err := srv.proc.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if err := srv.waitLog("SIGHUP"); err != nil {
		t.Fatalf("%v:\n%s", err, srv.out)
	}
	if _, err := sn.Stat(ctx, "upper"); err != nil {
		t.Fatalf("after SIGHUP: %v", err)
	}
	removeAndStop(ctx, t, sn, srv, "view", "missing-extract", "mapped", "upper", "base")
	testutil.RequireNoLeftovers(t, root)
}

// waitLog waits up to 10 s for text in the server's output.
func (s *server) waitLog(text string) error {
	return s.proc.WaitReady(10*time.Second, func() error {
		if !strings.Contains(s.out.String(), text) {
			return fmt.Errorf("no %q in the log", text)
		}
		return nil
	})
}

// removeAndStop removes the snapshots keys (newest first) through sn, then
// stops the server with SIGTERM and checks that it exits 0.
func removeAndStop(ctx context.Context, t *testing.T, sn snapshots.Snapshotter, srv *server, keys ...string) {
	t.Helper()
	for _, key := range keys {
		if err := sn.Remove(ctx, key); err != nil {
			t.Fatal(err)
		}
	}
	if err := srv.proc.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := srv.exitCode(); code != 0 {
		t.Fatalf("exit %d after SIGTERM:\n%s", code, srv.out)
	}
}
