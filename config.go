package fuseoverlayfs

import (
	"fmt"
	"strings"

	"github.com/containerd/errdefs"

	"github.com/fosnap/fuseoverlayfs/internal/layout"
)

// Config is the snapshotter's configuration: the keys users write under
// [plugins.'io.containerd.snapshotter.v1.fuse-overlayfs'].
// containerd-fuse-overlayfs-grpc embeds it in its own configuration type,
// which adds what only the server needs (content_dir).
type Config struct {
	// RootPath is where snapshots and metadata are kept. Empty means the
	// default chosen by the caller (containerd's plugin root directory).
	RootPath string `toml:"root_path"`
	// SyncRemove deletes a snapshot's directory inside Remove instead of
	// leaving it to Cleanup.
	SyncRemove bool `toml:"sync_remove"`
	// MountOptions are extra fuse-overlayfs options added to every overlay
	// mount, e.g. "noacl" or "static_nlink".
	MountOptions []string `toml:"mount_options"`
}

// Validate checks the configuration and returns an errdefs.ErrInvalidArgument
// error naming the offending value.
func (c *Config) Validate() error {
	return ValidateMountOptions(c.MountOptions)
}

// Opts turns the configuration into snapshotter options.
func (c *Config) Opts() []Opt {
	var opts []Opt
	if !c.SyncRemove {
		opts = append(opts, AsynchronousRemove)
	}
	if len(c.MountOptions) > 0 {
		opts = append(opts, WithMountOptions(c.MountOptions))
	}
	return opts
}

// ValidateMountOptions checks extra fuse-overlayfs options with
// layout.CheckExtraOption: each must be a single option (no ',' that would
// smuggle in more), with a non-empty key made of letters, digits, '_' and '-',
// no control characters or spaces, and not one the snapshotter sets itself or
// one that makes fuse-overlayfs or mount.fuse3 run code; and no key twice.
func ValidateMountOptions(options []string) error {
	seen := make(map[string]bool, len(options))
	for _, o := range options {
		key, _, _ := strings.Cut(o, "=")
		if seen[key] {
			return fmt.Errorf("mount option %q: %w: %s given twice (fuse-overlayfs would take the last; the differ refuses such mounts)", o, errdefs.ErrInvalidArgument, key)
		}
		seen[key] = true
		if err := layout.CheckExtraOption(o); err != nil {
			return fmt.Errorf("mount option %q: %w: %w", o, errdefs.ErrInvalidArgument, err)
		}
	}
	return nil
}
