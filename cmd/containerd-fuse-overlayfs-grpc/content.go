package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/errdefs"
	"github.com/moby/sys/userns"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"
)

// contentSubdir is where containerd keeps its content store below its root
// (the content plugin's ID).
const contentSubdir = "io.containerd.content.v1.content"

// contentDir reads layers from containerd's content store directory. A
// proxied Apply carries the layer's descriptor only; containerd has already
// fetched the blob into this directory. It never writes there: containerd's
// own local store, opened on the directory, would create an ingest
// directory and an fsverity probe in it.
type contentDir struct{ dir string }

// ReaderAt opens the blob of desc. A blob that is missing or cannot be read
// is an errdefs.ErrNotFound error naming the digest and the path looked at,
// keeping the system's error as its cause. Anything but a regular file in
// its place (FIFO, symlink, directory, device) is errdefs.ErrFailedPrecondition:
// the digest asked for is valid, the store's state is wrong.
func (c contentDir) ReaderAt(_ context.Context, desc ocispec.Descriptor) (content.ReaderAt, error) {
	// Validate before building a path from it: the digest comes from the
	// caller, and a bad one must not name a file elsewhere.
	if err := desc.Digest.Validate(); err != nil {
		return nil, fmt.Errorf("read layer %q: %w: %w", desc.Digest, errdefs.ErrInvalidArgument, err)
	}
	rel := filepath.Join("blobs", desc.Digest.Algorithm().String(), desc.Digest.Encoded())
	p := filepath.Join(c.dir, rel)
	f, st, err := openBlob(c.dir, rel)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, c.missing(desc, p, err)
	}
	if errors.Is(err, errNotRegular) {
		return nil, fmt.Errorf("read layer %s: %s: %w (containerd stores a blob as a regular file; remove it and pull the image again): %w", desc.Digest, p, err, errdefs.ErrFailedPrecondition)
	}
	if err != nil {
		return nil, fmt.Errorf("read layer %s from containerd's content store at %s: %w: %w", desc.Digest, p, errdefs.ErrNotFound, err)
	}
	// containerd renames a blob into place complete, so a size that
	// disagrees with the descriptor is another blob's descriptor, or damage.
	if desc.Size > 0 && st.Size() != desc.Size {
		_ = f.Close()
		return nil, fmt.Errorf("read layer %s: %s has %d bytes, the descriptor says %d: %w", desc.Digest, p, st.Size(), desc.Size, errdefs.ErrFailedPrecondition)
	}
	return blobReader{f: f, size: st.Size()}, nil
}

// missing is the error for a blob that is not at p: it names the digest,
// the path and the directory looked in, and how to point the server at
// containerd's store. The cause is the bare system error: the message
// already names the path.
func (c contentDir) missing(desc ocispec.Descriptor, p string, err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		err = pe.Err
	}
	what := p + " does not exist"
	if _, serr := os.Stat(c.dir); errors.Is(serr, fs.ErrNotExist) {
		what = "the directory " + c.dir + " does not exist"
	}
	return fmt.Errorf("read layer %s: not in containerd's content store: %s (the server reads layers from content_dir %s; set it, or --content-dir, to <containerd root>/%s, e.g. /var/lib/containerd/%s for root's containerd): %w: %w",
		desc.Digest, what, c.dir, contentSubdir, contentSubdir, errdefs.ErrNotFound, err)
}

// errNotRegular is the cause of a blob path naming anything but a regular
// file.
var errNotRegular = errors.New("not a regular file")

// openBlob opens the regular file rel below the content directory dir for
// reading. No symbolic link is followed below dir (RESOLVE_NO_SYMLINKS, or
// O_NOFOLLOW on the last component where the kernel has no openat2): a
// blob is containerd's file, never a link to one elsewhere. O_NONBLOCK
// keeps a FIFO from blocking the open until a writer comes, and a socket
// or driverless device fails with ENXIO or ENODEV; fstat on the open
// descriptor then decides, so nothing is checked by name and used by name.
// O_NONBLOCK is cleared before the file is read.
func openBlob(dir, rel string) (*os.File, os.FileInfo, error) {
	p := filepath.Join(dir, rel)
	fd, err := openBeneath(dir, rel)
	if errors.Is(err, unix.ELOOP) {
		return nil, nil, fmt.Errorf("%w: a symbolic link is on the path below %s", errNotRegular, dir)
	}
	// Only a socket or a device without a driver fails its open so.
	if errors.Is(err, unix.ENXIO) || errors.Is(err, unix.ENODEV) {
		return nil, nil, fmt.Errorf("%w: a socket or device (%w)", errNotRegular, err)
	}
	if err != nil {
		return nil, nil, &fs.PathError{Op: "open", Path: p, Err: err}
	}
	f := os.NewFile(uintptr(fd), p)
	st, err := f.Stat()
	if err == nil && !st.Mode().IsRegular() {
		err = fmt.Errorf("%w (mode %v)", errNotRegular, st.Mode())
	}
	if err == nil {
		err = unix.SetNonblock(fd, false)
	}
	if err != nil {
		_ = f.Close()
		return nil, nil, err
	}
	return f, st, nil
}

// openBeneath opens rel below dir without following any symbolic link
// there; a kernel without openat2 (before 5.6) refuses a link only as the
// last component.
func openBeneath(dir, rel string) (int, error) {
	const flags = unix.O_RDONLY | unix.O_NONBLOCK | unix.O_NOFOLLOW | unix.O_CLOEXEC
	dfd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	defer func() { _ = unix.Close(dfd) }()
	fd, err := unix.Openat2(dfd, rel, &unix.OpenHow{Flags: flags, Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS})
	if errors.Is(err, unix.ENOSYS) {
		return unix.Openat(dfd, rel, flags, 0)
	}
	return fd, err
}

// blobReader is an open blob.
type blobReader struct {
	f    *os.File
	size int64
}

func (b blobReader) ReadAt(p []byte, off int64) (int, error) { return b.f.ReadAt(p, off) }
func (b blobReader) Size() int64                             { return b.size }
func (b blobReader) Close() error                            { return b.f.Close() }

// defaultContentDir is containerd's content store directory below
// containerdRoot.
func defaultContentDir(getenv func(string) string, rootless bool) (string, error) {
	dir, err := containerdRoot(getenv, rootless)
	if err != nil {
		return "", fmt.Errorf("choose containerd's content store directory: %w; give --content-dir or content_dir", err)
	}
	return filepath.Join(dir, contentSubdir), nil
}

// containerdRoot is the root directory of a containerd set up the usual
// way for the user this server runs as: /var/lib/containerd for root; for
// a rootless user (not root, or root of a user namespace, as under
// nerdctl's `containerd-rootless-setuptool.sh nsenter`)
// $XDG_DATA_HOME/containerd, by default ~/.local/share/containerd, which
// nerdctl's containerd-rootless.sh binds onto /var/lib/containerd. Both the
// server's content directory and the check command's root derive from it.
func containerdRoot(getenv func(string) string, rootless bool) (string, error) {
	if !rootless {
		return "/var/lib/containerd", nil
	}
	if d := getenv("XDG_DATA_HOME"); filepath.IsAbs(d) {
		return filepath.Join(d, "containerd"), nil
	}
	if h := getenv("HOME"); filepath.IsAbs(h) {
		return filepath.Join(h, ".local", "share", "containerd"), nil
	}
	return "", fmt.Errorf("neither XDG_DATA_HOME nor HOME is an absolute path: %w", errdefs.ErrInvalidArgument)
}

// runningRootless tells whether this process is an unprivileged user or
// root of a user namespace, where containerd runs rootless.
func runningRootless() bool {
	return os.Geteuid() != 0 || userns.RunningInUserNS()
}
