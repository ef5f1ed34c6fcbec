package fuseoverlayfs

// SnapshotterConfig holds what the options set.
type SnapshotterConfig struct {
	asyncRemove  bool
	mountOptions []string
}

// Opt configures the snapshotter.
type Opt func(*SnapshotterConfig) error

// AsynchronousRemove makes Remove drop only the metadata; the directory is
// deleted by the next Cleanup.
func AsynchronousRemove(c *SnapshotterConfig) error {
	c.asyncRemove = true
	return nil
}

// WithMountOptions adds fuse-overlayfs options to every overlay mount (not to
// bind mounts). The options are validated with ValidateMountOptions.
func WithMountOptions(options []string) Opt {
	return func(c *SnapshotterConfig) error {
		if err := ValidateMountOptions(options); err != nil {
			return err
		}
		c.mountOptions = append(c.mountOptions, options...)
		return nil
	}
}
