package main

import (
	"context"
	"sort"
	"strings"
	"time"

	diffapi "github.com/containerd/containerd/api/services/diff/v1"
	"github.com/containerd/containerd/v2/contrib/diffservice"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/diff/apply"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"

	fuseoverlayfs "github.com/fosnap/fuseoverlayfs"
	"github.com/fosnap/fuseoverlayfs/differ"
	"github.com/fosnap/fuseoverlayfs/internal/layout"
)

// diffServer returns containerd's diff API served by our differ for the
// snapshotter rooted at root, reading layers through blobs. Apply writes
// layers of this root's active snapshots (as sn tells them) straight
// into their layer directories, and refuses any other directory of the root;
// other mounts get errdefs.ErrNotImplemented, which reaches containerd as
// gRPC's Unimplemented and back as ErrNotImplemented, so its diff service
// goes on to its next differ. Compare is not implemented (see
// differ.NewApplier): containerd's walking differ computes diffs.
func diffServer(root string, sn snapshots.Snapshotter, blobs content.Provider) diffapi.DiffServer {
	opts := []differ.Opt{differ.WithFallback(throughMount{apply.NewFileSystemApplier(blobs)})}
	if kl, ok := sn.(fuseoverlayfs.KindLookup); ok {
		opts = append(opts, differ.WithSnapshotKinds(root, kl.KindByID))
	}
	d := differ.NewApplier(blobs, []string{root}, opts...)
	return diffservice.FromApplierAndComparer(loggingApplier{d}, d)
}

// viaMountKey marks, in an Apply's context, that the layer went through the
// fallback, for the log line.
type viaMountKey struct{}

// throughMount is the fallback for this snapshotter's ID-mapped mounts,
// whose files must be written through the mapping: containerd's applier,
// which mounts them (in this server's mount namespace) and extracts there.
type throughMount struct{ a diff.Applier }

func (m throughMount) Apply(ctx context.Context, desc ocispec.Descriptor, mounts []mount.Mount, opts ...diff.ApplyOpt) (ocispec.Descriptor, error) {
	if flag, ok := ctx.Value(viaMountKey{}).(*bool); ok {
		*flag = true
	}
	return m.a.Apply(ctx, desc, mounts, opts...)
}

// loggingApplier logs every layer the server applies at info level, so
// that an operator (and the tests) can see the fast path at work.
type loggingApplier struct{ a diff.Applier }

func (l loggingApplier) Apply(ctx context.Context, desc ocispec.Descriptor, mounts []mount.Mount, opts ...diff.ApplyOpt) (ocispec.Descriptor, error) {
	start := time.Now()
	viaMount := new(bool)
	out, err := l.a.Apply(context.WithValue(ctx, viaMountKey{}, viaMount), desc, mounts, opts...)
	entry := log.G(ctx).WithField("digest", desc.Digest)
	switch {
	case errdefs.IsNotImplemented(err):
		entry.WithError(err).Debug("declined a layer: containerd's diff service goes on to its next differ")
	case err != nil:
		entry.WithError(err).Error("apply a layer")
	default:
		how := "directly"
		if *viaMount {
			how = "through the mount"
		}
		entry.WithFields(log.Fields{"diff": out.Digest, "bytes": out.Size, "d": time.Since(start).Round(time.Millisecond), "how": how, "target": target(mounts)}).Info("layer applied " + how)
	}
	return out, err
}

// target names where a layer went: the bind source or the upper directory.
func target(mounts []mount.Mount) string {
	if len(mounts) != 1 {
		return ""
	}
	if m, ok, err := layout.Parse(mounts[0]); ok && err == nil && m.Upper != "" {
		return m.Upper
	}
	return mounts[0].Source
}

// logDiffMetadata logs, at debug level, the gRPC metadata containerd sends
// with each call of the diff API: a proxied Apply carries no namespace or
// lease in its request, only what the client side put into the metadata.
func logDiffMetadata(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if strings.HasPrefix(info.FullMethod, "/"+diffapi.Diff_ServiceDesc.ServiceName+"/") {
		md, _ := metadata.FromIncomingContext(ctx)
		keys := make([]string, 0, len(md))
		for k := range md {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		fields := log.Fields{"method": info.FullMethod}
		for _, k := range keys {
			fields["md."+k] = strings.Join(md[k], ",")
		}
		log.G(ctx).WithFields(fields).Debug("diff call")
	}
	return handler(ctx, req)
}
