package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/fosnap/fuseoverlayfs/internal/testutil/tartest"
)

// TestBlobNotRegular: whatever is not a regular file where a blob should
// be is refused as a failed precondition naming the digest and the path,
// without blocking (a FIFO with no writer used to hang the open). The call
// runs on a goroutine and the test waits for its result; a hang is caught
// by the test binary's timeout.
func TestBlobNotRegular(t *testing.T) {
	outside := filepath.Join(t.TempDir(), "outside")
	if err := os.WriteFile(outside, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		make func(p string) error
	}{
		{"fifo", func(p string) error { return unix.Mkfifo(p, 0o644) }},
		{"symlink outside", func(p string) error { return os.Symlink(outside, p) }},
		{"symlink to /etc/shadow", func(p string) error { return os.Symlink("/etc/shadow", p) }},
		{"symlink to a fifo", func(p string) error {
			fifo := p + ".fifo"
			if err := unix.Mkfifo(fifo, 0o644); err != nil {
				return err
			}
			return os.Symlink(fifo, p)
		}},
		{"directory", func(p string) error { return os.Mkdir(p, 0o755) }},
		// 1:3 is /dev/null: a device any kernel has, harmless to open.
		{"char device", func(p string) error { return unix.Mknod(p, unix.S_IFCHR|0o644, int(unix.Mkdev(1, 3))) }},
		{"block device", func(p string) error { return unix.Mknod(p, unix.S_IFBLK|0o644, int(unix.Mkdev(7, 0))) }},
		// Major 240 is for local experiments: no driver, open fails ENXIO.
		{"driverless device", func(p string) error { return unix.Mknod(p, unix.S_IFCHR|0o644, int(unix.Mkdev(240, 0))) }},
		// A socket inode (the blob path is too long for bind's sun_path).
		{"socket", func(p string) error { return unix.Mknod(p, unix.S_IFSOCK|0o644, 0) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			desc := ocispec.Descriptor{Digest: digest.FromString(tc.name), Size: 1}
			p := filepath.Join(dir, "blobs", "sha256", desc.Digest.Encoded())
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := tc.make(p); err != nil {
				t.Fatalf("make %s (needs root: %v): %v", tc.name, os.Geteuid() == 0, err)
			}
			done := make(chan error, 1)
			go func() {
				ra, err := contentDir{dir}.ReaderAt(context.Background(), desc)
				if err == nil {
					_ = ra.Close()
				}
				done <- err
			}()
			err := <-done
			if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "not a regular file") ||
				!strings.Contains(err.Error(), p) || !strings.Contains(err.Error(), desc.Digest.String()) {
				t.Fatalf("got %v, want a failed precondition naming %s and %s", err, desc.Digest, p)
			}
		})
	}
}

// TestBlobReadAfterOpen: the blob opened without blocking reads as a
// plain file (O_NONBLOCK cleared).
func TestBlobReadAfterOpen(t *testing.T) {
	dir := t.TempDir()
	desc, _ := putLayer(t, dir, tartest.File("f", 0o644, "x"))
	f, _, err := openBlob(dir, filepath.Join("blobs", "sha256", desc.Digest.Encoded()))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	fl, err := unix.FcntlInt(f.Fd(), unix.F_GETFL, 0)
	if err != nil || fl&unix.O_NONBLOCK != 0 {
		t.Fatalf("flags %#x (%v): O_NONBLOCK still set", fl, err)
	}
}

// TestBlobDirSymlink: a symbolic link among the directories below the
// content directory (blobs/sha256 pointing elsewhere) is not followed,
// even to a real blob.
func TestBlobDirSymlink(t *testing.T) {
	elsewhere := t.TempDir()
	desc, _ := putLayer(t, elsewhere, tartest.File("f", 0o644, "x"))
	dir := t.TempDir()
	if err := os.Mkdir(filepath.Join(dir, "blobs"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(elsewhere, "blobs", "sha256"), filepath.Join(dir, "blobs", "sha256")); err != nil {
		t.Fatal(err)
	}
	ra, err := contentDir{dir}.ReaderAt(context.Background(), desc)
	if err == nil {
		_ = ra.Close()
	}
	if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "a symbolic link is on the path below "+dir) || !strings.Contains(err.Error(), desc.Digest.String()) {
		t.Fatalf("got %v, want a failed precondition naming the digest and the link", err)
	}
	// The content directory itself may be reached through a link.
	link := filepath.Join(t.TempDir(), "content")
	if err := os.Symlink(elsewhere, link); err != nil {
		t.Fatal(err)
	}
	ra, err = contentDir{link}.ReaderAt(context.Background(), desc)
	if err != nil {
		t.Fatal(err)
	}
	_ = ra.Close()
}
