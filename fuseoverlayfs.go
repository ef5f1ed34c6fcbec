//go:build linux

package fuseoverlayfs

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/continuity/fs"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"

	"github.com/fosnap/fuseoverlayfs/internal/layout"
	"github.com/fosnap/fuseoverlayfs/monitor"
)

type snapshotter struct {
	root        layout.Root
	ms          *storage.MetaStore
	asyncRemove bool
	options     []string
	mon         *monitor.Handle
}

// Compile-time proof of the interfaces containerd looks for.
var (
	_ snapshots.Snapshotter = (*snapshotter)(nil)
	_ snapshots.Cleaner     = (*snapshotter)(nil)
)

// NewSnapshotter opens (or creates) a snapshotter rooted at root. The returned
// value also implements snapshots.Cleaner. It does not run the host checks;
// call Supported for that.
func NewSnapshotter(root string, opts ...Opt) (snapshots.Snapshotter, error) {
	var config SnapshotterConfig
	for _, opt := range opts {
		if err := opt(&config); err != nil {
			return nil, err
		}
	}
	if err := validateRoot(root); err != nil {
		return nil, err
	}
	l := layout.Root(root)
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, fmt.Errorf("create snapshotter root: %w", err)
	}
	// The root holds every layer of every image: nobody but its owner
	// should be able to look in, whatever mode it was created with.
	if err := os.Chmod(root, 0o700); err != nil {
		return nil, fmt.Errorf("set mode of snapshotter root %s: %w", root, err)
	}
	dtype, err := fs.SupportsDType(root)
	if err != nil {
		return nil, fmt.Errorf("check d_type support of %s: %w", root, err)
	}
	if !dtype {
		return nil, fmt.Errorf("%s does not support d_type (an xfs formatted without ftype=1?): %w", root, errdefs.ErrNotImplemented)
	}
	for _, dir := range []string{l.Snapshots(), l.Empty()} {
		if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
			return nil, fmt.Errorf("create %s: %w", dir, err)
		}
	}
	ms, err := openMetaStore(root)
	if err != nil {
		return nil, err
	}
	o := &snapshotter{root: l, ms: ms, asyncRemove: config.asyncRemove, options: config.mountOptions}
	if err := o.recoverRoot(context.Background()); err != nil {
		_ = ms.Close()
		return nil, fmt.Errorf("recover snapshotter root %s: %w", root, err)
	}
	o.mon = monitor.Start(monitor.Source{Root: root, KeyOf: o.keyOf, Census: o.census})
	return o, nil
}

// metaStoreTimeout bounds the wait for the metadata store's lock. bbolt holds
// an exclusive flock on metadata.db while the store is open and, without a
// timeout, waits for it forever: a second containerd or proxy server on the
// same root would hang at start. A few seconds cover a handover where the
// previous holder is still closing; a live holder never lets go, so a longer
// wait would only delay the error.
const metaStoreTimeout = 5 * time.Second

// openMetaStore opens containerd's metadata store in root and takes its lock
// at once (the store itself would open the database lazily, at its first
// transaction), so that nothing in the root is touched unless this process
// owns it. A root another process holds fails with errdefs.ErrUnavailable.
func openMetaStore(root string) (*storage.MetaStore, error) {
	path := layout.Root(root).Metadata()
	ms, err := storage.NewMetaStore(path, func(o *bolt.Options) error {
		o.Timeout = metaStoreTimeout
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("open metadata store %s: %w", path, err)
	}
	err = ms.WithTransaction(context.Background(), false, func(context.Context) error { return nil })
	if err == nil {
		return ms, nil
	}
	_ = ms.Close()
	if errors.Is(err, bolterrors.ErrTimeout) {
		return nil, fmt.Errorf("open metadata store: snapshotter root %s is in use by another process (a containerd with the fuse-overlayfs plugin or a containerd-fuse-overlayfs-grpc server holds the lock on %s; waited %s): %w: %w",
			root, path, metaStoreTimeout, errdefs.ErrUnavailable, err)
	}
	return nil, fmt.Errorf("open metadata store %s: %w", path, err)
}

// validateRoot refuses roots whose path would break fuse-overlayfs' option
// string: ',' separates options and ':' separates lower directories.
func validateRoot(root string) error {
	if root == "" {
		return fmt.Errorf("snapshotter root is empty: %w", errdefs.ErrInvalidArgument)
	}
	if i := strings.IndexAny(root, ",:\x00"); i >= 0 {
		return fmt.Errorf("snapshotter root %q contains %q, which fuse-overlayfs options cannot carry: %w", root, root[i], errdefs.ErrInvalidArgument)
	}
	return nil
}

// maxKeyLen keeps keys well inside bbolt's key size limit (32 KiB).
const maxKeyLen = 4096

func validateKey(what, key string) error {
	switch {
	case key == "":
		return fmt.Errorf("%s is empty: %w", what, errdefs.ErrInvalidArgument)
	case len(key) > maxKeyLen:
		return fmt.Errorf("%s is %d bytes long, at most %d are allowed: %w", what, len(key), maxKeyLen, errdefs.ErrInvalidArgument)
	case strings.ContainsRune(key, 0):
		return fmt.Errorf("%s %q contains a NUL byte: %w", what, key, errdefs.ErrInvalidArgument)
	}
	return nil
}

// Stat returns the info of a snapshot.
func (o *snapshotter) Stat(ctx context.Context, key string) (info snapshots.Info, err error) {
	err = o.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		_, info, _, err = storage.GetInfo(ctx, key)
		return err
	})
	return info, err
}

// Update changes a snapshot's labels. ID-mapping labels are checked as at
// Prepare, so a snapshot never carries one that its mounts could not use.
func (o *snapshotter) Update(ctx context.Context, info snapshots.Info, fieldpaths ...string) (newInfo snapshots.Info, err error) {
	err = o.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		newInfo, err = storage.UpdateInfo(ctx, info, fieldpaths...)
		if err != nil {
			return err
		}
		_, err = idMapOptions(newInfo.Labels)
		return err
	})
	return newInfo, err
}

// Usage returns the space taken by a snapshot's own layer: recorded at commit
// for committed snapshots, measured now for active ones.
func (o *snapshotter) Usage(ctx context.Context, key string) (snapshots.Usage, error) {
	var (
		id    string
		info  snapshots.Info
		usage snapshots.Usage
	)
	if err := o.ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
		id, info, usage, err = storage.GetInfo(ctx, key)
		return err
	}); err != nil {
		return snapshots.Usage{}, err
	}
	if info.Kind == snapshots.KindActive {
		du, err := fs.DiskUsage(ctx, o.root.FS(id))
		if err != nil {
			return snapshots.Usage{}, fmt.Errorf("measure usage of %q: %w", key, err)
		}
		usage = snapshots.Usage(du)
	}
	return usage, nil
}

// Prepare creates an active snapshot on parent and returns its mounts.
func (o *snapshotter) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	return o.create(ctx, snapshots.KindActive, key, parent, opts)
}

// View creates a read-only snapshot of parent and returns its mounts.
func (o *snapshotter) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	return o.create(ctx, snapshots.KindView, key, parent, opts)
}

// Mounts returns the mounts of an active snapshot or view, the same as
// Prepare or View returned.
func (o *snapshotter) Mounts(ctx context.Context, key string) (m []mount.Mount, err error) {
	err = o.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		s, err := storage.GetSnapshot(ctx, key)
		if err != nil {
			return fmt.Errorf("get snapshot %q: %w", key, err)
		}
		_, info, _, err := storage.GetInfo(ctx, key)
		if err != nil {
			return fmt.Errorf("get info of snapshot %q: %w", key, err)
		}
		m, err = buildMounts(o.root, s, info.Labels, o.options)
		logMounts(ctx, "mounts", key, s, m)
		return err
	})
	return m, err
}

// Commit turns the active snapshot key into the committed snapshot name and
// records its usage. A parent given with snapshots.WithParent rebases a
// snapshot prepared without parent onto it (containerd's parallel unpack).
func (o *snapshotter) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) error {
	if err := validateKey("snapshot name", name); err != nil {
		return err
	}
	return o.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		id, info, _, err := storage.GetInfo(ctx, key)
		if err != nil {
			return err
		}
		if info.Kind != snapshots.KindActive {
			return fmt.Errorf("snapshot %q is not active: %w", key, errdefs.ErrFailedPrecondition)
		}
		// base holds what the options set, the parent given at commit among it.
		var base snapshots.Info
		for _, opt := range opts {
			if err := opt(&base); err != nil {
				return err
			}
		}
		// containerd's store would link a snapshot committed onto its own
		// name as its own parent: a cycle every later walk of the chain
		// would loop on.
		if base.Parent != "" && (base.Parent == name || base.Parent == key) {
			if _, _, _, err := storage.GetInfo(ctx, name); err == nil {
				return fmt.Errorf("commit %q as %q: %w", key, name, errdefs.ErrAlreadyExists)
			}
			return fmt.Errorf("commit %q as %q onto %q: a snapshot cannot be its own parent: %w", key, name, base.Parent, errdefs.ErrInvalidArgument)
		}
		if err := o.finishUnpack(ctx, id, key, name, info, base.Parent); err != nil {
			return err
		}
		du, err := fs.DiskUsage(ctx, o.root.FS(id))
		if err != nil {
			return fmt.Errorf("measure usage of %q: %w", key, err)
		}
		if _, err := storage.CommitActive(ctx, key, name, snapshots.Usage(du), opts...); err != nil {
			return fmt.Errorf("commit snapshot %q as %q: %w", key, name, err)
		}
		o.dropUnpackState(ctx, id)
		return nil
	})
}

// Remove deletes a snapshot. With AsynchronousRemove only the metadata goes
// now and Cleanup frees the directory later.
func (o *snapshotter) Remove(ctx context.Context, key string) error {
	var id string
	if err := o.ms.WithTransaction(ctx, true, func(ctx context.Context) (err error) {
		id, _, err = storage.Remove(ctx, key)
		if err != nil {
			return fmt.Errorf("remove snapshot %q: %w", key, err)
		}
		return nil
	}); err != nil {
		return err
	}
	if !o.asyncRemove {
		// The metadata is gone for good; a directory that fails to go now is
		// one Cleanup will find, so this is not the caller's error.
		if err := removeAll(o.root.Snapshot(id)); err != nil {
			log.G(ctx).WithError(err).WithField("path", o.root.Snapshot(id)).Warn("failed to remove snapshot directory; Cleanup will retry")
		}
	}
	return nil
}

// Walk calls fn for every snapshot that matches the filters.
func (o *snapshotter) Walk(ctx context.Context, fn snapshots.WalkFunc, filters ...string) error {
	return o.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		// A store that never held a snapshot has no buckets yet; walking it
		// finds nothing rather than failing.
		if _, err := storage.IDMap(ctx); errors.Is(err, errdefs.ErrNotFound) {
			return nil
		}
		return storage.WalkInfo(ctx, fn, filters...)
	})
}

// Cleanup removes every snapshot directory that the metadata store does not
// know: those of asynchronously removed snapshots and the leftovers of
// interrupted creates.
func (o *snapshotter) Cleanup(ctx context.Context) error {
	var dirs []string
	// A write transaction keeps creates out while the directory is read, so
	// a create's temporary directory is never mistaken for an orphan.
	if err := o.ms.WithTransaction(ctx, true, func(ctx context.Context) (err error) {
		dirs, err = o.orphans(ctx)
		return err
	}); err != nil {
		return err
	}
	var errs []error
	for _, dir := range dirs {
		if err := removeAll(dir); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// orphans lists the snapshot directories the store does not know, as
// getCleanupDirectories of containerd v2.4.2's overlay snapshotter does.
func (o *snapshotter) orphans(ctx context.Context) ([]string, error) {
	ids, err := storage.IDMap(ctx)
	if errors.Is(err, errdefs.ErrNotFound) {
		// No snapshot was ever stored: every directory is an orphan.
		ids, err = nil, nil
	}
	if err != nil {
		return nil, err
	}
	entries, err := os.ReadDir(o.root.Snapshots())
	if err != nil {
		return nil, err
	}
	var dirs []string
	for _, e := range entries {
		if _, ok := ids[e.Name()]; !ok {
			dirs = append(dirs, o.root.Snapshot(e.Name()))
		}
	}
	return dirs, nil
}

// Close releases the metadata store.
func (o *snapshotter) Close() error {
	o.mon.Close()
	return o.ms.Close()
}

// create follows createSnapshot of containerd v2.4.2's
// plugins/snapshots/overlay/overlay.go: the directory is built under a
// temporary name inside the write transaction and renamed to the snapshot's
// ID once the store holds it.
func (o *snapshotter) create(ctx context.Context, kind snapshots.Kind, key, parent string, opts []snapshots.Opt) (m []mount.Mount, err error) {
	if err := validateKey("snapshot key", key); err != nil {
		return nil, err
	}
	// tmp is the directory being built; placed is where it went once
	// renamed. Should the transaction still fail, both must go: the store
	// will hand the same ID out again.
	var tmp, placed string
	defer func() {
		for _, dir := range []string{tmp, placed} {
			if dir == "" || (dir == placed && err == nil) {
				continue
			}
			if rerr := os.RemoveAll(dir); rerr != nil {
				log.G(ctx).WithError(rerr).WithField("path", dir).Warn("failed to remove unfinished snapshot directory; Cleanup will retry")
			}
		}
	}()
	err = o.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		dir, err := o.newSnapshotDir(kind)
		tmp = dir
		if err != nil {
			return err
		}
		s, err := storage.CreateSnapshot(ctx, kind, key, parent, opts...)
		if err != nil {
			return fmt.Errorf("create snapshot %q: %w", key, err)
		}
		_, info, _, err := storage.GetInfo(ctx, key)
		if err != nil {
			return fmt.Errorf("get info of snapshot %q: %w", key, err)
		}
		// Building the mounts here checks the ID-mapping labels before
		// anything is stored.
		m, err = buildMounts(o.root, s, info.Labels, o.options)
		if err != nil {
			return err
		}
		logMounts(ctx, kind.String(), key, s, m)
		if len(s.ParentIDs) > 0 {
			if err := copyOwner(o.root.FS(s.ParentIDs[0]), layout.LayerIn(tmp)); err != nil {
				return err
			}
		}
		if err := os.Rename(tmp, o.root.Snapshot(s.ID)); err != nil {
			return fmt.Errorf("move snapshot directory into place: %w", err)
		}
		tmp, placed = "", o.root.Snapshot(s.ID)
		return nil
	})
	if err != nil {
		return nil, err
	}
	return m, nil
}

// newSnapshotDir makes a temporary directory holding fs (and work for an
// active snapshot); it is renamed into place only once the snapshot exists
// (prepareDirectory of containerd v2.4.2's overlay snapshotter).
func (o *snapshotter) newSnapshotDir(kind snapshots.Kind) (string, error) {
	tmp, err := os.MkdirTemp(o.root.Snapshots(), layout.NewSnapshotPattern)
	if err != nil {
		return "", fmt.Errorf("create temporary snapshot directory: %w", err)
	}
	if err := os.Mkdir(layout.LayerIn(tmp), 0o755); err != nil {
		return tmp, err
	}
	if kind == snapshots.KindActive {
		if err := os.Mkdir(layout.WorkIn(tmp), 0o700); err != nil {
			return tmp, err
		}
	}
	return tmp, nil
}

// copyOwner gives dst the owner of src, so a container's root directory keeps
// the owner its image gave it.
func copyOwner(src, dst string) error {
	st, err := os.Stat(src)
	if err != nil {
		return fmt.Errorf("stat parent layer: %w", err)
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Errorf("stat parent layer %s: no ownership information", src)
	}
	if err := os.Lchown(dst, int(sys.Uid), int(sys.Gid)); err != nil {
		return fmt.Errorf("set owner of new layer: %w", err)
	}
	return nil
}
