package differ

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"slices"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/archive/compression"
	"github.com/containerd/containerd/v2/pkg/epoch"
	clabels "github.com/containerd/containerd/v2/pkg/labels"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/fosnap/fuseoverlayfs/internal/layer"
	"github.com/fosnap/fuseoverlayfs/internal/layout"
)

// errNotOurs marks mounts the fast comparer does not handle.
var errNotOurs = errors.New("not a comparison of this snapshotter's layers")

// compareLayers recognises a comparison of this snapshotter's snapshots:
// upper is an active snapshot's mounts (a fuse-overlayfs mount with its
// upperdir, or a bind of a snapshot without parent) or a view of a
// committed one (a bind, or a fuse-overlayfs mount without upperdir whose
// first lowerdir is the snapshot), and lower shows exactly the layers
// under it. It returns the upper layer directory and the lower ones,
// newest first.
func (d *Differ) compareLayers(lower, upper []mount.Mount) (string, []string, error) {
	up, err := d.layersOf(upper)
	if err != nil {
		return "", nil, err
	}
	if len(up) == 0 {
		return "", nil, fmt.Errorf("%w: upper mounts show no layer", errNotOurs)
	}
	low, err := d.layersOf(lower)
	if err != nil {
		return "", nil, err
	}
	if !slices.Equal(up[1:], low) {
		return "", nil, fmt.Errorf("%w: lower mounts are not the upper's parents", errNotOurs)
	}
	return up[0], low, nil
}

// layersOf lists the layer directories mounts show, newest first.
func (d *Differ) layersOf(mounts []mount.Mount) ([]string, error) {
	switch len(mounts) {
	case 0:
		return nil, nil
	case 1:
	default:
		return nil, fmt.Errorf("%w: %d mounts", errNotOurs, len(mounts))
	}
	m, ok, err := layout.Parse(mounts[0])
	switch {
	case err != nil:
		return nil, err
	case !ok:
		return nil, fmt.Errorf("%w: mount type %s", errNotOurs, mounts[0].Type)
	case m.Bind:
		if _, _, ok := d.layerOf(m.Source); !ok {
			return nil, fmt.Errorf("%w: bind of %s", errNotOurs, m.Source)
		}
		return []string{filepath.Clean(m.Source)}, nil
	}
	var dirs []string
	var root layout.Root
	add := func(p string) error {
		r, _, ok := d.layerOf(p)
		if !ok || (root != "" && r != root) {
			return fmt.Errorf("%w: layer %s", errNotOurs, p)
		}
		root = r
		dirs = append(dirs, filepath.Clean(p))
		return nil
	}
	if m.Upper != "" {
		if err := add(m.Upper); err != nil {
			return nil, err
		}
	}
	for _, l := range m.Lowers {
		if l == "" || (root != "" && filepath.Clean(l) == root.Empty()) {
			continue
		}
		if err := add(l); err != nil {
			return nil, err
		}
	}
	return dirs, nil
}

// compareFast writes the diff of upper over lower from the upper layer
// directory (writeFast), and counts it.
func (d *Differ) compareFast(ctx context.Context, upperDir string, lowers []string, opts ...diff.Opt) (ocispec.Descriptor, error) {
	start := time.Now()
	desc, err := d.writeFast(ctx, upperDir, lowers, opts...)
	countCompare("fast", start, err)
	return desc, err
}

// writeFast writes the diff of upper over lower from the upper layer
// directory, as containerd's walking differ writes it: the same options
// (media type and compression, custom compressor, labels, source date
// epoch, reference), the same content store calls and labels. The steps
// are a port of walkingDiff.Compare in containerd v2.4.2
// plugins/diff/walking/differ.go, with layer.Export in place of
// archive.WriteDiff over two mounts.
func (d *Differ) writeFast(ctx context.Context, upperDir string, lowers []string, opts ...diff.Opt) (ocispec.Descriptor, error) {
	config, compressionType, err := diffConfig(ctx, opts)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	start := time.Now()
	cw, abort, err := d.openDiffWriter(ctx, &config)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	exportOpts := layer.ExportOptions{Lowers: lowers, SourceDateEpoch: config.SourceDateEpoch}
	if err := writeLayer(ctx, cw, &config, compressionType, upperDir, exportOpts); err != nil {
		abort()
		return ocispec.Descriptor{}, err
	}
	dgst, err := commitDiff(ctx, cw, config.Labels)
	if err != nil {
		abort()
		return ocispec.Descriptor{}, err
	}
	info, err := d.labelUncompressed(ctx, dgst, config.Labels[clabels.LabelUncompressed])
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	log.G(ctx).WithFields(log.Fields{"d": time.Since(start), "digest": info.Digest, "upper": upperDir}).Debug("diff written from the upper directory")
	return ocispec.Descriptor{MediaType: config.MediaType, Size: info.Size, Digest: info.Digest}, nil
}

// diffConfig applies opts (the source date epoch defaulting to ctx's) and
// picks the compression of the media type, gzip unless set.
func diffConfig(ctx context.Context, opts []diff.Opt) (diff.Config, compression.Compression, error) {
	var config diff.Config
	for _, opt := range opts {
		if err := opt(&config); err != nil {
			return config, 0, err
		}
	}
	if tm := epoch.FromContext(ctx); tm != nil && config.SourceDateEpoch == nil {
		config.SourceDateEpoch = tm
	}
	if config.Compressor != nil {
		if config.MediaType == "" {
			return config, 0, errors.New("media type must be explicitly specified when using custom compressor")
		}
		return config, compression.Unknown, nil
	}
	if config.MediaType == "" {
		config.MediaType = ocispec.MediaTypeImageLayerGzip
	}
	switch config.MediaType {
	case ocispec.MediaTypeImageLayer:
		return config, compression.Uncompressed, nil
	case ocispec.MediaTypeImageLayerGzip:
		return config, compression.Gzip, nil
	case ocispec.MediaTypeImageLayerZstd:
		return config, compression.Zstd, nil
	}
	return config, 0, fmt.Errorf("unsupported diff media type: %v: %w", config.MediaType, errdefs.ErrNotImplemented)
}

// openDiffWriter opens the content writer of config's reference (a new
// unique one if unset, which it then records in config), emptied. abort
// closes the writer and deletes the upload if the reference is new.
func (d *Differ) openDiffWriter(ctx context.Context, config *diff.Config) (content.Writer, func(), error) {
	newReference := false
	if config.Reference == "" {
		newReference = true
		config.Reference = uniqueRef()
	}
	cw, err := content.OpenWriter(ctx, d.store, content.WithRef(config.Reference),
		content.WithDescriptor(ocispec.Descriptor{MediaType: config.MediaType}))
	if err != nil {
		return nil, nil, fmt.Errorf("failed to open writer: %w", err)
	}
	ref := config.Reference
	abort := func() {
		_ = cw.Close()
		if !newReference {
			return
		}
		if err := d.store.Abort(ctx, ref); err != nil {
			log.G(ctx).WithError(err).WithField("ref", ref).Warn("failed to delete diff upload")
		}
	}
	if !newReference {
		if err := cw.Truncate(0); err != nil {
			abort()
			return nil, nil, err
		}
	}
	return cw, abort, nil
}

// writeLayer exports the layer tar of upperDir into cw, compressed as
// compressionType says; a compressed one gets the uncompressed digest in
// config's labels.
func writeLayer(ctx context.Context, cw content.Writer, config *diff.Config, compressionType compression.Compression, upperDir string, exportOpts layer.ExportOptions) error {
	if compressionType == compression.Uncompressed {
		if err := layer.Export(ctx, cw, upperDir, exportOpts); err != nil {
			return fmt.Errorf("failed to write diff: %w", err)
		}
		return nil
	}
	var compressed io.WriteCloser
	var err error
	if config.Compressor != nil {
		compressed, err = config.Compressor(cw, config.MediaType)
	} else {
		compressed, err = compression.CompressStream(cw, compressionType)
	}
	if err != nil {
		return fmt.Errorf("failed to get compressed stream: %w", err)
	}
	dgstr := digest.SHA256.Digester()
	err = layer.Export(ctx, io.MultiWriter(compressed, dgstr.Hash()), upperDir, exportOpts)
	if cerr := compressed.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("failed to write compressed diff: %w", err)
	}
	if config.Labels == nil {
		config.Labels = map[string]string{}
	}
	config.Labels[clabels.LabelUncompressed] = dgstr.Digest().String()
	return nil
}

// commitDiff commits what cw holds with labels and returns its digest; a
// blob already in the store counts as committed.
func commitDiff(ctx context.Context, cw content.Writer, labels map[string]string) (digest.Digest, error) {
	var commitopts []content.Opt
	if labels != nil {
		commitopts = append(commitopts, content.WithLabels(labels))
	}
	dgst := cw.Digest()
	if err := cw.Commit(ctx, 0, dgst, commitopts...); err != nil && !errdefs.IsAlreadyExists(err) {
		return "", fmt.Errorf("failed to commit: %w", err)
	}
	return dgst, nil
}

// labelUncompressed returns the info of the committed blob dgst, giving it
// the uncompressed-digest label (value uncompressed) if a blob already
// stored lacked it.
func (d *Differ) labelUncompressed(ctx context.Context, dgst digest.Digest, uncompressed string) (content.Info, error) {
	info, err := d.store.Info(ctx, dgst)
	if err != nil {
		return content.Info{}, fmt.Errorf("failed to get info from content store: %w", err)
	}
	if _, ok := info.Labels[clabels.LabelUncompressed]; ok {
		return info, nil
	}
	if info.Labels == nil {
		info.Labels = map[string]string{}
	}
	info.Labels[clabels.LabelUncompressed] = uncompressed
	if _, err := d.store.Update(ctx, info, "labels."+clabels.LabelUncompressed); err != nil {
		return content.Info{}, fmt.Errorf("error setting uncompressed label: %w", err)
	}
	return info, nil
}

// uniqueRef makes an upload reference as uniqueRef in containerd v2.4.2
// plugins/diff/walking/differ.go does.
func uniqueRef() string {
	t := time.Now()
	var b [3]byte
	_, _ = rand.Read(b[:])
	return fmt.Sprintf("%d-%s", t.UnixNano(), base64.URLEncoding.EncodeToString(b[:]))
}
