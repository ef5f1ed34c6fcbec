// Command containerd-fuse-overlayfs-grpc serves the fuse-overlayfs snapshotter
// over containerd's snapshots gRPC API, and its fast layer applier over
// containerd's diff gRPC API, on one unix socket, for a containerd that does
// not have the plugin built in. containerd reaches both as proxy plugins:
//
//	[proxy_plugins."fuse-overlayfs"]
//	  type = "snapshot"
//	  address = "/run/user/1000/containerd-fuse-overlayfs/grpc.sock"
//	  capabilities = ["remap-ids", "rebase"]
//	[proxy_plugins."fuse-overlayfs-differ"]
//	  type = "diff"
//	  address = "/run/user/1000/containerd-fuse-overlayfs/grpc.sock"
//
// Usage:
//
//	containerd-fuse-overlayfs-grpc [flags] <socket> <root>
//	containerd-fuse-overlayfs-grpc check [--root DIR] [--json]
//
// The root may be left out when the configuration file sets root_path. The
// configuration file takes the keys of the built-in plugin's section
// (root_path, sync_remove, mount_options) at its top level, and content_dir:
// containerd's content store directory, from which the layers are read.
//
// The socket's directory is created with mode 0700 if missing and must
// belong to the server's user with that mode; every directory above it must
// belong to root or that user and not be writable by group or others unless
// sticky (as /tmp), so that nobody else can put another socket at the path.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"
	"runtime/debug"
	"time"

	"github.com/containerd/log"
)

const name = "containerd-fuse-overlayfs-grpc"

// version is set at build time (-ldflags "-X main.version=..."); otherwise
// the module version from the build information is printed.
var version = ""

// shutdownGrace is how long in-flight requests may take after SIGTERM
// before their connections are closed.
const shutdownGrace = 10 * time.Second

// Exit codes: 2 for a bad command line or configuration, 1 for anything
// that fails at run time (host checks included).
const (
	exitFailure = 1
	exitUsage   = 2
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 && args[0] == "check" {
		return runCheck(args[1:], stdout, stderr)
	}
	o, err := parseArgs(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		_, _ = fmt.Fprintf(stderr, "%s: %v\nusage: %s [--config FILE] [--content-dir DIR] [--log-level LEVEL] [--metrics-address ADDR] <socket> <root>\n       %s check [--root DIR] [--json]\n", name, err, name, name)
		return exitUsage
	}
	if o.version {
		printVersion(stdout)
		return 0
	}
	cfg, err := resolve(o)
	if err != nil {
		_, _ = fmt.Fprintf(stderr, "%s: %v\n", name, err)
		return exitUsage
	}
	log.L.Logger.SetOutput(stderr)
	if err := serve(context.Background(), cfg); err != nil {
		_, _ = fmt.Fprintf(stderr, "%s: %v\n", name, err)
		return exitFailure
	}
	return 0
}

func printVersion(w io.Writer) {
	v, containerd := version, "unknown"
	if bi, ok := debug.ReadBuildInfo(); ok {
		if v == "" {
			v = bi.Main.Version
		}
		for _, d := range bi.Deps {
			if d.Path == "github.com/containerd/containerd/v2" {
				containerd = d.Version
			}
		}
	}
	if v == "" {
		v = "(devel)"
	}
	_, _ = fmt.Fprintf(w, "%s %s\ncontainerd %s\n%s\n", name, v, containerd, runtime.Version())
}
