//go:build linux

package fuseoverlayfs

import (
	"context"
	"errors"
	"fmt"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
)

var _ KindLookup = (*snapshotter)(nil)

// KindByID returns the kind of the snapshot whose directory is
// snapshots/<id>, read from the metadata store in a read-only transaction;
// an ID no snapshot has (a directory left for Cleanup, say) is
// errdefs.ErrNotFound. The store is keyed by name, so this reads every
// snapshot's ID once (no file access); the differ asks once per layer.
func (o *snapshotter) KindByID(ctx context.Context, id string) (kind snapshots.Kind, err error) {
	err = o.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		ids, err := storage.IDMap(ctx)
		if err != nil && !errors.Is(err, errdefs.ErrNotFound) {
			return fmt.Errorf("list snapshot IDs: %w", err)
		}
		key, ok := ids[id]
		if !ok {
			return fmt.Errorf("snapshot ID %s: %w", id, errdefs.ErrNotFound)
		}
		_, info, _, err := storage.GetInfo(ctx, key)
		if err != nil {
			return fmt.Errorf("get info of snapshot %q: %w", key, err)
		}
		kind = info.Kind
		return nil
	})
	return kind, err
}
