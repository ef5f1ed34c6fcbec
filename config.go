package fuseoverlayfs

import (
	"fmt"
	"path/filepath"
	"strings"

	"github.com/containerd/errdefs"

	"github.com/fosnap/fuseoverlayfs/internal/layout"
)

// Config is the configuration shared by the built-in plugin and the gRPC
// proxy server. Its TOML keys are the ones users write under
// [plugins.'io.containerd.snapshotter.v1.fuse-overlayfs'].
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
	// ContentDir is containerd's content store directory,
	// <containerd root>/io.containerd.content.v1.content, from which
	// containerd-fuse-overlayfs-grpc reads the layers containerd asks it to
	// apply: a proxied Apply carries the layer's descriptor, not its bytes.
	// Empty means the default for the user the server runs as. The
	// built-in plugin reads containerd's content store itself and ignores it.
	ContentDir string `toml:"content_dir"`
}

// Validate checks the configuration and returns an errdefs.ErrInvalidArgument
// error naming the offending value.
func (c *Config) Validate() error {
	if err := ValidateMountOptions(c.MountOptions); err != nil {
		return err
	}
	return validateContentDir(c.ContentDir)
}

// validateContentDir wants an absolute path: the server may run from any
// working directory (systemd starts units in /), so a relative one would
// name a different place in each setup.
func validateContentDir(dir string) error {
	switch {
	case dir == "":
		return nil
	case strings.ContainsRune(dir, 0):
		return fmt.Errorf("content_dir %q: contains a NUL byte: %w", dir, errdefs.ErrInvalidArgument)
	case !filepath.IsAbs(dir):
		return fmt.Errorf("content_dir %q: want an absolute path, e.g. /var/lib/containerd/io.containerd.content.v1.content: %w", dir, errdefs.ErrInvalidArgument)
	}
	return nil
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
