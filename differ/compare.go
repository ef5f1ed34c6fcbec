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
// epoch, reference), the same content store calls and labels.
func (d *Differ) writeFast(ctx context.Context, upperDir string, lowers []string, opts ...diff.Opt) (ocispec.Descriptor, error) {
	var config diff.Config
	for _, opt := range opts {
		if err := opt(&config); err != nil {
			return ocispec.Descriptor{}, err
		}
	}
	if tm := epoch.FromContext(ctx); tm != nil && config.SourceDateEpoch == nil {
		config.SourceDateEpoch = tm
	}
	compressionType := compression.Uncompressed
	if config.Compressor != nil {
		if config.MediaType == "" {
			return ocispec.Descriptor{}, errors.New("media type must be explicitly specified when using custom compressor")
		}
		compressionType = compression.Unknown
	} else {
		if config.MediaType == "" {
			config.MediaType = ocispec.MediaTypeImageLayerGzip
		}
		switch config.MediaType {
		case ocispec.MediaTypeImageLayer:
		case ocispec.MediaTypeImageLayerGzip:
			compressionType = compression.Gzip
		case ocispec.MediaTypeImageLayerZstd:
			compressionType = compression.Zstd
		default:
			return ocispec.Descriptor{}, fmt.Errorf("unsupported diff media type: %v: %w", config.MediaType, errdefs.ErrNotImplemented)
		}
	}
	start := time.Now()
	exportOpts := layer.ExportOptions{Lowers: lowers, SourceDateEpoch: config.SourceDateEpoch}

	newReference := false
	if config.Reference == "" {
		newReference = true
		config.Reference = uniqueRef()
	}
	cw, err := content.OpenWriter(ctx, d.store, content.WithRef(config.Reference),
		content.WithDescriptor(ocispec.Descriptor{MediaType: config.MediaType}))
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("failed to open writer: %w", err)
	}
	var errOpen error
	defer func() {
		if errOpen != nil {
			_ = cw.Close()
			if newReference {
				if abortErr := d.store.Abort(ctx, config.Reference); abortErr != nil {
					log.G(ctx).WithError(abortErr).WithField("ref", config.Reference).Warn("failed to delete diff upload")
				}
			}
		}
	}()
	if !newReference {
		if errOpen = cw.Truncate(0); errOpen != nil {
			return ocispec.Descriptor{}, errOpen
		}
	}
	if compressionType != compression.Uncompressed {
		dgstr := digest.SHA256.Digester()
		var compressed io.WriteCloser
		if config.Compressor != nil {
			compressed, errOpen = config.Compressor(cw, config.MediaType)
		} else {
			compressed, errOpen = compression.CompressStream(cw, compressionType)
		}
		if errOpen != nil {
			return ocispec.Descriptor{}, fmt.Errorf("failed to get compressed stream: %w", errOpen)
		}
		errOpen = layer.Export(ctx, io.MultiWriter(compressed, dgstr.Hash()), upperDir, exportOpts)
		if cerr := compressed.Close(); errOpen == nil {
			errOpen = cerr
		}
		if errOpen != nil {
			return ocispec.Descriptor{}, fmt.Errorf("failed to write compressed diff: %w", errOpen)
		}
		if config.Labels == nil {
			config.Labels = map[string]string{}
		}
		config.Labels[clabels.LabelUncompressed] = dgstr.Digest().String()
	} else if errOpen = layer.Export(ctx, cw, upperDir, exportOpts); errOpen != nil {
		return ocispec.Descriptor{}, fmt.Errorf("failed to write diff: %w", errOpen)
	}

	var commitopts []content.Opt
	if config.Labels != nil {
		commitopts = append(commitopts, content.WithLabels(config.Labels))
	}
	dgst := cw.Digest()
	if errOpen = cw.Commit(ctx, 0, dgst, commitopts...); errOpen != nil {
		if !errdefs.IsAlreadyExists(errOpen) {
			return ocispec.Descriptor{}, fmt.Errorf("failed to commit: %w", errOpen)
		}
		errOpen = nil
	}
	info, err := d.store.Info(ctx, dgst)
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("failed to get info from content store: %w", err)
	}
	if info.Labels == nil {
		info.Labels = map[string]string{}
	}
	if _, ok := info.Labels[clabels.LabelUncompressed]; !ok {
		info.Labels[clabels.LabelUncompressed] = config.Labels[clabels.LabelUncompressed]
		if _, err := d.store.Update(ctx, info, "labels."+clabels.LabelUncompressed); err != nil {
			return ocispec.Descriptor{}, fmt.Errorf("error setting uncompressed label: %w", err)
		}
	}
	log.G(ctx).WithFields(log.Fields{"d": time.Since(start), "digest": info.Digest, "upper": upperDir}).Debug("diff written from the upper directory")
	return ocispec.Descriptor{MediaType: config.MediaType, Size: info.Size, Digest: info.Digest}, nil
}

func uniqueRef() string {
	t := time.Now()
	var b [3]byte
	_, _ = rand.Read(b[:])
	return fmt.Sprintf("%d-%s", t.UnixNano(), base64.URLEncoding.EncodeToString(b[:]))
}
