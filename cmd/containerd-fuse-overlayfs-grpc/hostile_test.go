package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	diffapi "github.com/containerd/containerd/api/services/diff/v1"
	diffproxy "github.com/containerd/containerd/v2/core/diff/proxy"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/fosnap/fuseoverlayfs/internal/layout"
	"github.com/fosnap/fuseoverlayfs/internal/testutil"
	"github.com/fosnap/fuseoverlayfs/internal/testutil/tartest"
)

// withOption returns a copy of m with the option whose key is key replaced
// by opt (or opt added).
func withOption(m mount.Mount, key, opt string) mount.Mount {
	out := m
	out.Options = nil
	for _, o := range m.Options {
		if k, _, _ := strings.Cut(o, "="); k != key {
			out.Options = append(out.Options, o)
		}
	}
	out.Options = append(out.Options, opt)
	return out
}

// assertEmptyDir fails unless dir exists and holds nothing.
func assertEmptyDir(t *testing.T, dir string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil || len(entries) != 0 {
		t.Errorf("%s: %v, %v; want it empty", dir, entries, err)
	}
}

// assertOnly fails unless dir holds exactly the file name, of content "x".
func assertOnly(t *testing.T, dir, name string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil || len(entries) != 1 || entries[0].Name() != name {
		t.Errorf("%s: %v, %v; want only %s", dir, entries, err, name)
		return
	}
	if b, err := os.ReadFile(filepath.Join(dir, name)); err != nil || string(b) != "x" {
		t.Errorf("%s/%s: %q, %v; want \"x\"", dir, name, b, err)
	}
}

// TestHostileDiffRequests sends the diff API of a started server requests
// a caller could forge: mounts of this snapshotter's type with a smuggled
// option, with an upper directory outside the root, of another snapshot or
// of a committed one, a bind of a committed layer, a traversing bind
// source, and blobs that are links or FIFOs. Each gets the gRPC code
// containerd acts on and a message naming what was wrong; nothing is
// written outside the root, into the other snapshot nor into the layer, and
// the server goes on serving a good request afterwards.
func TestHostileDiffRequests(t *testing.T) {
	testutil.RequireFUSE(t)
	dir := shortDir(t)
	root := filepath.Join(dir, "root")
	contentRoot := filepath.Join(dir, "content")
	outside := filepath.Join(dir, "outside")
	for _, d := range []string{outside, filepath.Join(outside, "fs"), filepath.Join(outside, "work")} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	socket := filepath.Join(dir, "run", "s.sock")
	srv := start(t, nil, socket, root, "--content-dir", contentRoot)
	sn, conn, err := srv.serving(socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	d := diffproxy.NewDiffApplier(diffapi.NewDiffClient(conn)).(differClient)
	ctx := namespaces.WithNamespace(context.Background(), "test")

	desc, diffID := putLayer(t, contentRoot, tartest.File("pwned", 0o644, "x"))
	baseMounts, err := sn.Prepare(ctx, "base-extract", "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.Apply(ctx, desc, baseMounts); err != nil {
		t.Fatal(err)
	}
	if err := sn.Commit(ctx, "base", "base-extract"); err != nil {
		t.Fatal(err)
	}
	victim, err := sn.Prepare(ctx, "victim", "base")
	if err != nil {
		t.Fatal(err)
	}
	active, err := sn.Prepare(ctx, "active", "base")
	if err != nil {
		t.Fatal(err)
	}
	victimM, ok, err := layout.Parse(victim[0])
	if err != nil || !ok || victimM.Upper == "" {
		t.Fatalf("victim mounts %v: %v", victim, err)
	}
	a := active[0]
	baseFS := baseMounts[0].Source
	baseID := filepath.Base(filepath.Dir(baseFS))
	// What the hostile requests carry: a file no layer of the test has.
	planted, _ := putLayer(t, contentRoot, tartest.File("planted", 0o644, "x"))

	for _, tc := range []struct {
		name   string
		mounts []mount.Mount
		is     func(error) bool
		code   string
		want   string
	}{
		{"uidmapping smuggles upperdir", []mount.Mount{withOption(a, "uidmapping", "uidmapping=0:0:65536,upperdir="+outside+"/fs,workdir="+outside+"/work")},
			errdefs.IsInvalidArgument, "InvalidArgument", `"uidmapping=0:0:65536,upperdir=` + outside},
		{"gidmapping smuggles upperdir", []mount.Mount{withOption(a, "gidmapping", "gidmapping=0:0:65536,upperdir="+outside+"/fs")},
			errdefs.IsInvalidArgument, "InvalidArgument", "gidmapping=0:0:65536,upperdir="},
		{"upperdir given twice", []mount.Mount{withOption(a, "x", "upperdir="+outside+"/fs")},
			errdefs.IsInvalidArgument, "InvalidArgument", "given twice"},
		{"upperdir with a traversal", []mount.Mount{withOption(a, "upperdir", "upperdir="+victimM.Upper+"/../../../../outside/fs")},
			errdefs.IsInvalidArgument, "InvalidArgument", "upperdir="},
		{"upperdir outside the root", []mount.Mount{withOption(withOption(a, "upperdir", "upperdir="+outside+"/fs"), "workdir", "workdir="+outside+"/work")},
			errdefs.IsNotImplemented, "Unimplemented", "upperdir and workdir outside the snapshotter roots"},
		{"upperdir of another snapshot", []mount.Mount{withOption(a, "upperdir", "upperdir="+victimM.Upper)},
			errdefs.IsFailedPrecondition, "FailedPrecondition", "upperdir " + victimM.Upper + " lies in the fuse-overlayfs snapshotter root"},
		{"upperdir of a committed snapshot", []mount.Mount{withOption(withOption(a, "upperdir", "upperdir="+baseFS), "workdir", "workdir="+filepath.Join(filepath.Dir(baseFS), "work"))},
			errdefs.IsFailedPrecondition, "FailedPrecondition", baseFS + ": snapshot " + baseID + " is Committed, not active"},
		{"bind of a committed snapshot", baseMounts,
			errdefs.IsFailedPrecondition, "FailedPrecondition", baseFS + ": snapshot " + baseID + " is Committed, not active"},
		{"bind of a directory outside", []mount.Mount{{Type: "bind", Source: outside + "/fs", Options: []string{"rw", "rbind"}}},
			errdefs.IsNotImplemented, "Unimplemented", "bind source outside the snapshotter roots"},
		{"bind source traversing out", []mount.Mount{{Type: "bind", Source: baseMounts[0].Source + "/../../../../outside/fs", Options: []string{"rw", "rbind"}}},
			errdefs.IsNotImplemented, "Unimplemented", "bind source outside the snapshotter roots"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := d.Apply(ctx, planted, tc.mounts)
			if !tc.is(err) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Apply: got %v, want %s naming %q", err, tc.code, tc.want)
			}
			if _, err := d.Compare(ctx, tc.mounts, tc.mounts); !errdefs.IsNotImplemented(err) {
				t.Errorf("Compare: got %v, want Unimplemented (the server only applies)", err)
			}
			assertEmptyDir(t, filepath.Join(outside, "fs"))
			assertEmptyDir(t, victimM.Upper)
			assertOnly(t, baseFS, "pwned")
		})
	}

	// Blobs that are not containerd's files.
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		make func(p string) error
	}{
		{"link to /etc/shadow", func(p string) error { return os.Symlink("/etc/shadow", p) }},
		{"link to a FIFO", func(p string) error { return os.Symlink(fifo, p) }},
		{"FIFO", func(p string) error { return unix.Mkfifo(p, 0o600) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bad := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromString(tc.name), Size: 1}
			p := filepath.Join(contentRoot, "blobs", "sha256", bad.Digest.Encoded())
			if err := tc.make(p); err != nil {
				t.Fatal(err)
			}
			_, err := d.Apply(ctx, bad, active)
			if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), p) || !strings.Contains(err.Error(), "not a regular file") {
				t.Errorf("got %v, want FailedPrecondition naming %s, not a regular file", err, p)
			}
			assertEmptyDir(t, filepath.Join(layout.Root(root).Snapshot(snapshotID(t, a)), "fs"))
		})
	}

	// Still serving: the good layer goes into the active snapshot.
	if got, err := d.Apply(ctx, desc, active); err != nil || got.Digest != diffID {
		t.Fatalf("a good Apply after the hostile ones: %v, %v\n%s", got.Digest, err, srv.out)
	}
	removeAndStop(ctx, t, sn, srv, "active", "victim", "base")
	assertEmptyDir(t, filepath.Join(outside, "fs"))
	testutil.RequireNoLeftovers(t, root)
}

// snapshotID is the ID of the snapshot whose fuse-overlayfs mount is m.
func snapshotID(t *testing.T, m mount.Mount) string {
	t.Helper()
	p, ok, err := layout.Parse(m)
	if err != nil || !ok {
		t.Fatalf("parse %v: %v", m, err)
	}
	return filepath.Base(filepath.Dir(p.Upper))
}
