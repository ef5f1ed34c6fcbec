package fuseoverlayfs

import (
	"context"

	"github.com/containerd/containerd/v2/core/snapshots"
)

// KindLookup is implemented by the snapshotter NewSnapshotter returns. Its
// KindByID tells the kind of the snapshot stored in snapshots/<id> of the
// root, so that a differ writing layers straight into layer directories
// (differ.WithSnapshotKinds) writes only into active snapshots.
type KindLookup interface {
	KindByID(ctx context.Context, id string) (snapshots.Kind, error)
}
