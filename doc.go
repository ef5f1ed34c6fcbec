// Package fuseoverlayfs is a containerd snapshotter that keeps each layer as a
// plain directory and hands out overlay mounts served by the fuse-overlayfs
// program, for hosts where the kernel's overlayfs cannot be used (rootless
// containerd on older kernels, nested containers, unusual backing
// filesystems).
//
// The package is the snapshotter alone and registers nothing when imported.
// Around it: plugin/ builds it (and its differ) into containerd, hostcheck/
// tells whether a host can run it, monitor/ watches its fuse-overlayfs
// servers and serves metrics, differ/ applies and compares its layers, and
// internal/layout says where everything lives in a root and what its mounts
// look like.
//
// It runs on Linux only. On other systems the package still compiles, so
// that a cross-platform program can import it, but NewSnapshotter returns an
// error saying so.
package fuseoverlayfs
