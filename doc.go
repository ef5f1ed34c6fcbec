// Package fuseoverlayfs is a containerd snapshotter that keeps each layer as a
// plain directory and hands out overlay mounts served by the fuse-overlayfs
// program, for hosts where the kernel's overlayfs cannot be used (rootless
// containerd on older kernels, nested containers, unusual backing
// filesystems).
//
// The package holds no plugin registration; import the plugin subpackage to
// build it into containerd.
//
// It runs on Linux only. On other systems the package still compiles, so
// that a cross-platform program can import it, but Supported, Check and
// NewSnapshotter return an error saying so.
package fuseoverlayfs
