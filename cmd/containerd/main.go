// Command containerd is the containerd v2 daemon with the fuse-overlayfs
// snapshotter compiled in.
//
// It carries the same built-in plugins as containerd's own daemon (CRI
// included). Build it with the tags "no_btrfs no_devmapper no_zfs" so that
// the snapshotters needing C headers are left out.
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/containerd/containerd/v2/cmd/containerd/command"

	// containerd's usual set of built-in plugins (CRI, runtime, snapshotters,
	// transfer service, ...), selected per platform and build tags.
	_ "github.com/containerd/containerd/v2/cmd/containerd/builtins"

	// Our snapshotter: registers io.containerd.snapshotter.v1 "fuse-overlayfs".
	_ "github.com/fosnap/fuseoverlayfs/plugin"
)

func main() {
	app := command.App()
	if err := app.Run(context.Background(), os.Args); err != nil {
		fmt.Fprintln(os.Stderr, "containerd:", err)
		os.Exit(1)
	}
}
