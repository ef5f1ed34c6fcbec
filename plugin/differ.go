//go:build linux

package plugin

import (
	"errors"
	"fmt"

	"github.com/containerd/containerd/v2/core/diff/apply"
	"github.com/containerd/containerd/v2/core/metadata"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/plugins"
	"github.com/containerd/log"
	"github.com/containerd/platforms"
	"github.com/containerd/plugin"
	"github.com/containerd/plugin/registry"

	fuseoverlayfs "github.com/fosnap/fuseoverlayfs"
	"github.com/fosnap/fuseoverlayfs/differ"
)

// The diff plugin (type io.containerd.differ.v1, ID fuse-overlayfs) applies
// layers straight into this snapshotter's layer directories. It always
// loads, even when the snapshotter is skipped, so a diff service order that
// names it keeps working: it then declines every mount.
func init() {
	registry.Register(&plugin.Registration{
		Type: plugins.DiffPlugin,
		ID:   ID,
		Requires: []plugin.Type{
			plugins.MetadataPlugin,
			plugins.MountManagerPlugin,
			plugins.SnapshotPlugin,
		},
		InitFn: initDiffer,
	})
}

func initDiffer(ic *plugin.InitContext) (any, error) {
	md, err := ic.GetSingle(plugins.MetadataPlugin)
	if err != nil {
		return nil, err
	}
	db, ok := md.(*metadata.DB)
	if !ok {
		return nil, fmt.Errorf("fuse-overlayfs differ: metadata plugin has type %T", md)
	}
	var mm mount.Manager
	if inst, err := ic.GetSingle(plugins.MountManagerPlugin); err == nil {
		mm, _ = inst.(mount.Manager)
	} else if !errors.Is(err, plugin.ErrPluginNotFound) {
		return nil, err
	}
	differ.RegisterMetrics()
	cs := db.ContentStore()
	opts := []differ.Opt{differ.WithFallback(apply.NewFileSystemApplierWithMountManager(cs, mm))}
	roots, kinds := snapshotterRoot(ic)
	if kinds != nil {
		opts = append(opts, kinds)
	} else {
		log.G(ic.Context).Warn("fuse-overlayfs differ: the fuse-overlayfs snapshotter is not loaded; the differ declines every mount")
	}
	ic.Meta.Platforms = append(ic.Meta.Platforms, platforms.DefaultSpec())
	return differ.New(cs, roots, opts...), nil
}

// snapshotterRoot returns the loaded snapshotter's root and the option that
// lets the differ ask it which snapshots are active, so that Apply writes
// only into those; nothing if the snapshotter did not load.
func snapshotterRoot(ic *plugin.InitContext) ([]string, differ.Opt) {
	p := ic.Plugins().Get(plugins.SnapshotPlugin, ID)
	if p == nil || p.Err() != nil {
		return nil, nil
	}
	root := p.Meta.Exports[plugins.SnapshotterRootDir]
	inst, err := p.Instance()
	kl, ok := inst.(fuseoverlayfs.KindLookup)
	if root == "" || err != nil || !ok {
		return nil, nil
	}
	return []string{root}, differ.WithSnapshotKinds(root, kl.KindByID)
}
