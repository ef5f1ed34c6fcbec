// Package differ is a containerd diff plugin implementation for the
// fuse-overlayfs snapshotter. Its applier writes image layers straight into
// an active snapshot's layer directory instead of pushing every file
// through a FUSE mount, and never into a committed layer or a view (see
// WithSnapshotKinds). Its comparer reads the snapshot's upper directory
// directly (our fast Compare, compare.go) and falls back to containerd's
// walking differ for mounts it cannot read that way.
package differ

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/plugins/diff/walking"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/fosnap/fuseoverlayfs/internal/layer"
	"github.com/fosnap/fuseoverlayfs/internal/layout"
)

// Differ compares like containerd's walking differ and applies layers
// directly into the layer directories of fuse-overlayfs snapshotters rooted
// at its roots. Mounts of anything else get errdefs.ErrNotImplemented, so
// containerd's diff service tries its next differ.
type Differ struct {
	provider content.Provider
	roots    []layout.Root
	comparer diff.Comparer // nil: Compare is not implemented
	store    content.Store // where Compare writes diffs (nil with NewApplier)
	fallback diff.Applier
	forms    *layer.Forms
	kinds    map[layout.Root]KindFunc // per root: whether a snapshot is active (owner.go)
}

// Opt configures a Differ.
type Opt func(*Differ)

// WithFallback sets the applier used for this snapshotter's mounts that the
// direct path does not handle (ID-mapped ones, whose files must be written
// through the mapping). Without it they get errdefs.ErrNotImplemented.
func WithFallback(a diff.Applier) Opt {
	return func(d *Differ) { d.fallback = a }
}

// WithUnprivilegedForms writes whiteouts and opaque directories in the
// forms fuse-overlayfs reads without privileges (`.wh.NAME` files and the
// user.fuseoverlayfs.opaque xattr) even where the privileged ones (0/0
// character devices, trusted.overlay.opaque) could be made; tests use it to
// check the fallback.
func WithUnprivilegedForms() Opt {
	return func(d *Differ) {
		f := layer.FallbackForms
		d.forms = &f
	}
}

// New returns a Differ for the snapshotter roots given. It reads layers
// from store and writes the diffs it computes into it.
func New(store content.Store, roots []string, opts ...Opt) *Differ {
	d := NewApplier(store, roots, opts...)
	d.store = store
	d.comparer = walking.NewWalkingDiff(store)
	return d
}

// NewApplier returns a Differ that only applies: it reads layers from
// provider, and its Compare returns errdefs.ErrNotImplemented, so that
// containerd's diff service goes on to its next differ. For a process that
// can read containerd's layers but not add content to its store
// (containerd-fuse-overlayfs-grpc).
func NewApplier(provider content.Provider, roots []string, opts ...Opt) *Differ {
	d := &Differ{provider: provider}
	for _, r := range roots {
		if r != "" {
			d.roots = append(d.roots, layout.Root(filepath.Clean(r)))
		}
	}
	for _, o := range opts {
		o(d)
	}
	return d
}

// Compare computes the diff between two mounts. For this snapshotter's own
// mounts (an upper layer directory over exactly the lower mounts' layers)
// it writes the layer tar from the upper directory itself, never through
// FUSE (compare.go); other mounts go to containerd's walking differ. A
// Differ made by NewApplier has no store to write a diff into and returns
// errdefs.ErrNotImplemented.
func (d *Differ) Compare(ctx context.Context, lower, upper []mount.Mount, opts ...diff.Opt) (ocispec.Descriptor, error) {
	if d.comparer == nil {
		return ocispec.Descriptor{}, fmt.Errorf("compare mounts: this differ only applies layers: %w", errdefs.ErrNotImplemented)
	}
	if d.store != nil {
		upperDir, lowers, err := d.compareLayers(lower, upper)
		if err == nil {
			return d.compareFast(ctx, upperDir, lowers, opts...)
		}
		// A mount of ours with options the snapshotter never writes is
		// refused: the walking differ would mount it as it stands.
		if errdefs.IsInvalidArgument(err) {
			return ocispec.Descriptor{}, fmt.Errorf("compare mounts: %w", err)
		}
		log.G(ctx).WithError(err).Debug("compare: using the walking differ")
	}
	return d.compareFallback(ctx, lower, upper, opts...)
}

// target is where a layer goes.
type target struct {
	dir      string
	lowers   []string
	detached bool
	state    string
	idmapped bool
}

// apply extracts the layer desc into t, the snapshot the mounts belong to.
// Its steps (options, reader, progress, stream processors, digest of the
// whole stream, processor errors, syncfs) follow fsApplier.Apply in
// containerd v2.4.2 core/diff/apply/apply.go, with layer.Apply in place of
// mounting and extracting through the mounts.
func (d *Differ) apply(ctx context.Context, t target, desc ocispec.Descriptor, mounts []mount.Mount, opts ...diff.ApplyOpt) (ocispec.Descriptor, error) {
	if t.idmapped {
		if d.fallback == nil {
			return ocispec.Descriptor{}, fmt.Errorf("ID-mapped fuse-overlayfs mount: %w", errdefs.ErrNotImplemented)
		}
		return d.fallback.Apply(ctx, desc, mounts, opts...)
	}
	start := time.Now()
	var config diff.ApplyConfig
	for _, o := range opts {
		if err := o(ctx, desc, &config); err != nil {
			return ocispec.Descriptor{}, fmt.Errorf("apply option: %w", err)
		}
	}
	ra, err := d.provider.ReaderAt(ctx, desc)
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("get reader for layer %s: %w", desc.Digest, err)
	}
	defer func() { _ = ra.Close() }()
	var r io.Reader = content.NewReader(ra) //nolint:staticcheck // r is replaced below
	if config.Progress != nil {
		pr := &progressReader{r: r, p: config.Progress}
		defer func() { config.Progress(pr.n) }()
		r = pr
	}
	// External stream processors run under ctx: cancelling it when apply
	// returns kills one that hangs, and closing their pipes (a child of
	// theirs may hold the other end) ends the read ahead in flight, so
	// ahead.Close does not wait for it forever.
	ctx, cancel := context.WithCancel(ctx)
	tarStream, processors, err := layerStream(ctx, desc.MediaType, r, &config)
	if err != nil {
		cancel()
		return ocispec.Descriptor{}, err
	}
	defer func() { _ = tarStream.Close() }()

	digester := digest.Canonical.Digester()
	ahead := newReadAhead(io.TeeReader(tarStream, digester.Hash()))
	defer func() {
		cancel()
		closePipes(processors)
		_ = ahead.Close()
	}()
	rc := &countReader{r: ahead}
	if err := layer.Apply(ctx, t.dir, rc, layer.Options{Lowers: t.lowers, Detached: t.detached, StateFile: t.state, Forms: d.forms}); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("apply layer %s to %s: %w", desc.Digest, t.dir, err)
	}
	// The digest covers the whole stream, trailing data included.
	if _, err := io.Copy(io.Discard, rc); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("read layer %s: %w", desc.Digest, err)
	}
	if err := processorsErr(processors); err != nil {
		return ocispec.Descriptor{}, err
	}
	if config.SyncFs {
		if err := syncFs(t.dir); err != nil {
			return ocispec.Descriptor{}, err
		}
	}
	log.G(ctx).WithFields(log.Fields{"d": time.Since(start), "digest": desc.Digest, "dir": t.dir, "detached": t.detached}).Debug("layer applied directly")
	return ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayer, Size: rc.n, Digest: digester.Digest()}, nil
}

// layerStream chains the stream processors that turn r, a blob of
// mediaType, into a plain layer tar (config's payloads passed to them). It
// returns the last processor, the tar to read, and all of them, whose
// errors show only once the tar is read (processorsErr).
func layerStream(ctx context.Context, mediaType string, r io.Reader, config *diff.ApplyConfig) (diff.StreamProcessor, []diff.StreamProcessor, error) {
	processor := diff.NewProcessorChain(mediaType, r)
	processors := []diff.StreamProcessor{processor}
	for {
		next, err := diff.GetProcessor(ctx, processor, config.ProcessorPayloads)
		if err != nil {
			_ = processor.Close()
			return nil, nil, fmt.Errorf("get stream processor for %s: %w", mediaType, err)
		}
		processor = next
		processors = append(processors, processor)
		if processor.MediaType() == ocispec.MediaTypeImageLayer {
			return processor, processors, nil
		}
	}
}

// closePipes closes the read end of each external processor's output. A
// Read in flight on it returns (os.File allows Close during Read); the
// processors' own Close, later, finds it closed.
func closePipes(processors []diff.StreamProcessor) {
	for _, p := range processors {
		if rp, ok := p.(diff.RawProcessor); ok {
			_ = rp.File().Close()
		}
	}
}

// processorsErr returns the first error a stream processor reports (an
// external one's exit status, for one).
func processorsErr(processors []diff.StreamProcessor) error {
	for _, p := range processors {
		if ep, ok := p.(interface{ Err() error }); ok {
			if err := ep.Err(); err != nil {
				return err
			}
		}
	}
	return nil
}

func syncFs(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }()
	if err := unix.Syncfs(int(f.Fd())); err != nil {
		return fmt.Errorf("syncfs %s: %w", dir, err)
	}
	return nil
}

// target recognises this snapshotter's mounts: a read-write bind mount of
// <root>/snapshots/<id>/fs (an active snapshot without parent), or a
// fuse-overlayfs mount whose upper, work and lower directories all lie in
// the same root. The snapshot written into must be active (checkActive); a
// mount that would write anywhere else in a root is refused.
func (d *Differ) target(ctx context.Context, mounts []mount.Mount) (target, error) {
	notOurs := func(why string) (target, error) {
		return target{}, fmt.Errorf("not a fuse-overlayfs snapshot mount (%s): %w", why, errdefs.ErrNotImplemented)
	}
	if len(mounts) != 1 {
		return notOurs(fmt.Sprintf("%d mounts", len(mounts)))
	}
	m, ok, err := layout.Parse(mounts[0])
	switch {
	case err != nil:
		return target{}, err
	case !ok:
		return notOurs("type " + mounts[0].Type)
	case m.Bind:
		if !m.RW {
			return notOurs("read-only bind")
		}
		root, id, ok := d.layerOf(m.Source)
		if !ok {
			if r, in := d.rootHolding(m.Source); in {
				return target{}, refuseInRoot("bind source", m.Source, r)
			}
			return notOurs("bind source outside the snapshotter roots")
		}
		if err := d.checkActive(ctx, root, id, filepath.Clean(m.Source)); err != nil {
			return target{}, err
		}
		return target{dir: filepath.Clean(m.Source), detached: true, state: layer.StateFile(root.Snapshot(id))}, nil
	case m.Upper == "":
		return notOurs("no upperdir")
	}
	root, id, ok := d.layerOf(m.Upper)
	if !ok || filepath.Clean(m.Work) != root.Work(id) {
		return d.foreignOverlay(m)
	}
	if err := d.checkActive(ctx, root, id, filepath.Clean(m.Upper)); err != nil {
		return target{}, err
	}
	t := target{dir: filepath.Clean(m.Upper), idmapped: m.IDMapped}
	for _, l := range m.Lowers {
		if filepath.Clean(l) == root.Empty() {
			continue
		}
		lroot, _, ok := d.layerOf(l)
		if !ok || lroot != root {
			return notOurs("lowerdir outside the snapshotter root")
		}
		t.lowers = append(t.lowers, filepath.Clean(l))
	}
	return t, nil
}

// foreignOverlay declines an overlay whose upper and work directories are
// not a snapshot's pair, unless either lies in a root: the next differ
// would write there.
func (d *Differ) foreignOverlay(m layout.Mount) (target, error) {
	for _, p := range []struct{ what, dir string }{{"upperdir", m.Upper}, {"workdir", m.Work}} {
		if r, in := d.rootHolding(p.dir); in {
			return target{}, refuseInRoot(p.what, p.dir, r)
		}
	}
	return target{}, fmt.Errorf("not a fuse-overlayfs snapshot mount (upperdir and workdir outside the snapshotter roots): %w", errdefs.ErrNotImplemented)
}

// layerOf tells whether p is a layer directory of one of the roots (and an
// existing directory), and whose.
func (d *Differ) layerOf(p string) (layout.Root, string, bool) {
	for _, r := range d.roots {
		id, ok := r.LayerID(p)
		if !ok {
			continue
		}
		if st, err := os.Lstat(p); err != nil || !st.IsDir() {
			continue
		}
		return r, id, true
	}
	return "", "", false
}

type countReader struct {
	r io.Reader
	n int64
}

func (c *countReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

type progressReader struct {
	r io.Reader
	n int64
	p func(int64)
}

func (pr *progressReader) Read(b []byte) (int, error) {
	pr.p(pr.n)
	n, err := pr.r.Read(b)
	pr.n += int64(n)
	return n, err
}
