//go:build linux

package fuseoverlayfs

import (
	"context"
	"strings"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"

	"github.com/fosnap/fuseoverlayfs/monitor"
)

// census counts the snapshots of the metadata store by kind and sums the
// usage recorded for the committed ones, in one read transaction.
func (o *snapshotter) census(ctx context.Context) monitor.Census {
	c := monitor.Census{Kinds: map[string]float64{}}
	_ = o.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		if _, err := storage.IDMap(ctx); errdefs.IsNotFound(err) {
			return nil
		}
		return storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
			c.Kinds[strings.ToLower(info.Kind.String())]++
			if info.Kind == snapshots.KindCommitted {
				if _, _, u, err := storage.GetInfo(ctx, info.Name); err == nil {
					c.Bytes += float64(u.Size)
					c.Inodes += float64(u.Inodes)
				}
			}
			return nil
		})
	})
	return c
}

// keyOf returns the key of the snapshot with ID id, or "" when unknown.
func (o *snapshotter) keyOf(id string) string {
	var key string
	_ = o.ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		ids, err := storage.IDMap(ctx)
		if err == nil {
			key = ids[id]
		}
		return nil
	})
	return key
}
