package fuseoverlayfs

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/containerd/errdefs"
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

// reservedOptions are set by the snapshotter itself; letting a user set them
// would point a mount at another snapshot's data or fake an ID mapping.
var reservedOptions = map[string]bool{
	"lowerdir":   true,
	"upperdir":   true,
	"workdir":    true,
	"uidmapping": true,
	"gidmapping": true,
}

// ValidateMountOptions checks extra fuse-overlayfs options: each must be a
// single option (no ',' that would smuggle in more), with a non-empty key made
// of letters, digits, '_' and '-', no control characters or spaces, and not
// one the snapshotter sets itself.
func ValidateMountOptions(options []string) error {
	for _, o := range options {
		if err := validateMountOption(o); err != nil {
			return fmt.Errorf("mount option %q: %w: %w", o, errdefs.ErrInvalidArgument, err)
		}
	}
	return nil
}

func validateMountOption(o string) error {
	if o == "" {
		return errors.New("empty option")
	}
	for _, c := range o {
		switch {
		case c == ',':
			return errors.New("',' separates options; give each option as its own list item")
		case c < 0x20 || c == 0x7f || c == ' ':
			return errors.New("contains a space or control character")
		}
	}
	key, _, _ := strings.Cut(o, "=")
	if key == "" {
		return errors.New("option has no name before '='")
	}
	for _, c := range key {
		if (c < 'a' || c > 'z') && (c < 'A' || c > 'Z') && (c < '0' || c > '9') && c != '_' && c != '-' {
			return fmt.Errorf("option name %q has character %q", key, c)
		}
	}
	if reservedOptions[key] {
		return fmt.Errorf("%s is set by the snapshotter and cannot be configured", key)
	}
	return nil
}
