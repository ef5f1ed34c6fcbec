// Package plugin registers two containerd plugins named fuse-overlayfs: the
// snapshotter (io.containerd.snapshotter.v1) and its differ
// (io.containerd.differ.v1, differ.go), which applies layers straight into
// the snapshotter's layer directories and compares them without FUSE. At
// load the snapshotter runs hostcheck.Require and registers the monitor's
// metrics. Blank-import it into a containerd build:
//
//	import _ "github.com/fosnap/fuseoverlayfs/plugin"
package plugin

import (
	"fmt"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/plugins"
	"github.com/containerd/log"
	"github.com/containerd/platforms"
	"github.com/containerd/plugin"
	"github.com/containerd/plugin/registry"

	fuseoverlayfs "github.com/fosnap/fuseoverlayfs"
	"github.com/fosnap/fuseoverlayfs/hostcheck"
	"github.com/fosnap/fuseoverlayfs/monitor"
)

// ID is the snapshotter's name, as in `ctr --snapshotter fuse-overlayfs`.
const ID = "fuse-overlayfs"

// capRemapIDs tells containerd that the snapshotter maps IDs itself (through
// fuse-overlayfs' uidmapping/gidmapping), so it must not chown layers.
const capRemapIDs = "remap-ids"

func init() {
	registry.Register(&plugin.Registration{
		Type:   plugins.SnapshotPlugin,
		ID:     ID,
		Config: &fuseoverlayfs.Config{},
		InitFn: initSnapshotter,
	})
}

func initSnapshotter(ic *plugin.InitContext) (any, error) {
	config, ok := ic.Config.(*fuseoverlayfs.Config)
	if !ok {
		return nil, fmt.Errorf("fuse-overlayfs snapshotter: config has type %T, want *fuseoverlayfs.Config", ic.Config)
	}
	if err := config.Validate(); err != nil {
		return nil, fmt.Errorf("fuse-overlayfs snapshotter: invalid configuration: %w", err)
	}
	root := ic.Properties[plugins.PropertyRootDir]
	if config.RootPath != "" {
		root = config.RootPath
	}
	info, err := hostcheck.Require(root)
	if err != nil {
		// Skipping keeps containerd running without this snapshotter;
		// `ctr plugins ls -d` shows the reason.
		return nil, fmt.Errorf("%w: %w", plugin.ErrSkipPlugin, err)
	}
	ic.Meta.Platforms = append(ic.Meta.Platforms, platforms.DefaultSpec())
	ic.Meta.Exports[plugins.SnapshotterRootDir] = root
	ic.Meta.Exports["fuse-overlayfs-version"] = info.Version
	ic.Meta.Capabilities = append(ic.Meta.Capabilities, capRemapIDs, snapshots.RebaseCap)
	// containerd serves the default registry on its [metrics] address.
	monitor.Register()
	sn, err := fuseoverlayfs.NewSnapshotter(root, config.Opts()...)
	if err != nil {
		// Skipped, not failed: containerd's metadata plugin refuses to load
		// when any snapshotter fails with another error, and every service
		// goes with it. A root that another process holds is the usual
		// case; containerd runs on without this snapshotter.
		return nil, fmt.Errorf("%w: fuse-overlayfs snapshotter: %w", plugin.ErrSkipPlugin, err)
	}
	log.G(ic.Context).WithFields(log.Fields{
		"fuse-overlayfs": info.FuseOverlayfs, "version": info.Version, "root": root, "open-files": info.OpenFiles,
	}).Info("fuse-overlayfs snapshotter ready")
	return sn, nil
}
