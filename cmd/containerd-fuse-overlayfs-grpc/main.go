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
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	diffapi "github.com/containerd/containerd/api/services/diff/v1"
	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/pelletier/go-toml/v2"
	"google.golang.org/grpc"

	fuseoverlayfs "github.com/fosnap/fuseoverlayfs"
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

type options struct {
	socket, root string
	contentDir   string
	configPath   string
	logLevel     string
	metricsAddr  string
	version      bool
}

// usageError is a mistake in the command line or the configuration file.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

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
	cfg, err := resolve(&o)
	if err != nil {
		_, _ = fmt.Fprintf(stderr, "%s: %v\n", name, err)
		return exitUsage
	}
	log.L.Logger.SetOutput(stderr)
	if err := serve(context.Background(), o, cfg); err != nil {
		_, _ = fmt.Fprintf(stderr, "%s: %v\n", name, err)
		return exitFailure
	}
	return 0
}

// parseArgs accepts flags before, between and after the two positional
// arguments, so that both `grpc SOCKET ROOT --config F` and
// `grpc --config F SOCKET ROOT` work.
func parseArgs(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.configPath, "config", "", "TOML `file` with root_path, sync_remove and mount_options (the built-in plugin's keys) and content_dir")
	fs.StringVar(&o.contentDir, "content-dir", "", "containerd's content store `directory`, <containerd root>/"+contentSubdir+", where the layers to apply are read (default: the one of a root containerd, or of a rootless one as nerdctl sets it up)")
	fs.StringVar(&o.logLevel, "log-level", "info", "log `level`: trace, debug, info, warn, error, fatal or panic")
	fs.StringVar(&o.metricsAddr, "metrics-address", "", "serve Prometheus metrics at /v1/metrics on this `address`: 127.0.0.1:PORT, [::1]:PORT, localhost:PORT or unix:/PATH (loopback or a unix socket only); default: not served")
	fs.BoolVar(&o.version, "version", false, "print the version and exit")
	fs.Usage = func() {
		_, _ = fmt.Fprintf(fs.Output(), "usage: %s [flags] <socket> <root>\n\nServes the fuse-overlayfs snapshotter over containerd's snapshots gRPC API on <socket>,\nkeeping snapshots under <root> (optional when the config file sets root_path), and\nits layer applier over containerd's diff gRPC API on the same socket.\n\nflags:\n", name)
		fs.PrintDefaults()
	}
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return o, err
			}
			return o, usageError{err}
		}
		args = fs.Args()
		if len(args) == 0 {
			break
		}
		positional = append(positional, args[0])
		args = args[1:]
	}
	if o.version {
		return o, nil
	}
	switch len(positional) {
	case 1:
		o.socket = positional[0]
	case 2:
		o.socket, o.root = positional[0], positional[1]
	case 0:
		return o, usageError{errors.New("the socket path is missing")}
	default:
		return o, usageError{fmt.Errorf("too many arguments: %q (want <socket> <root>)", positional)}
	}
	if o.socket == "" {
		return o, usageError{errors.New("the socket path is empty")}
	}
	if err := log.SetLevel(o.logLevel); err != nil {
		return o, usageError{fmt.Errorf("--log-level %q: %w", o.logLevel, err)}
	}
	if o.metricsAddr != "" {
		if err := checkMetricsAddress(o.metricsAddr); err != nil {
			return o, usageError{err}
		}
	}
	return o, nil
}

// resolve reads the configuration file, settles the root and makes both
// paths absolute: fuse-overlayfs mount options must carry absolute paths,
// since containerd mounts them from its own working directory.
func resolve(o *options) (fuseoverlayfs.Config, error) {
	var cfg fuseoverlayfs.Config
	if o.configPath != "" {
		var err error
		if cfg, err = loadConfig(o.configPath); err != nil {
			return cfg, err
		}
	}
	switch {
	case o.root == "" && cfg.RootPath == "":
		return cfg, usageError{fmt.Errorf("the snapshotter root is missing: give it as the second argument or as root_path in the config file: %w", errdefs.ErrInvalidArgument)}
	case o.root == "":
		o.root = cfg.RootPath
	case cfg.RootPath != "" && filepath.Clean(cfg.RootPath) != filepath.Clean(o.root):
		return cfg, usageError{fmt.Errorf("the root argument %q and root_path %q in %s differ: give one of them: %w", o.root, cfg.RootPath, o.configPath, errdefs.ErrInvalidArgument)}
	}
	if err := resolveContentDir(o, &cfg); err != nil {
		return cfg, err
	}
	for _, p := range []*string{&o.root, &o.socket, &o.contentDir} {
		abs, err := filepath.Abs(*p)
		if err != nil {
			return cfg, err
		}
		*p = abs
	}
	cfg.RootPath = o.root
	cfg.ContentDir = o.contentDir
	return cfg, nil
}

// resolveContentDir settles containerd's content store directory: the flag,
// or content_dir from the config file, or the default for this user.
func resolveContentDir(o *options, cfg *fuseoverlayfs.Config) error {
	switch {
	case o.contentDir != "" && cfg.ContentDir != "" && filepath.Clean(cfg.ContentDir) != filepath.Clean(o.contentDir):
		return usageError{fmt.Errorf("--content-dir %q and content_dir %q in %s differ: give one of them: %w", o.contentDir, cfg.ContentDir, o.configPath, errdefs.ErrInvalidArgument)}
	case o.contentDir != "":
	case cfg.ContentDir != "":
		o.contentDir = cfg.ContentDir
	default:
		dir, err := defaultContentDir(os.Getenv, runningRootless())
		if err != nil {
			return usageError{err}
		}
		o.contentDir = dir
	}
	return nil
}

// loadConfig decodes a configuration file strictly: an unknown key (a typo
// would otherwise be ignored silently) or a value of the wrong type is an
// error naming the key.
func loadConfig(path string) (fuseoverlayfs.Config, error) {
	var cfg fuseoverlayfs.Config
	f, err := os.Open(path)
	if err != nil {
		return cfg, usageError{fmt.Errorf("config file: %w", err)}
	}
	defer func() { _ = f.Close() }()
	dec := toml.NewDecoder(f).DisallowUnknownFields()
	if err := dec.Decode(&cfg); err != nil {
		var strict *toml.StrictMissingError
		var decErr *toml.DecodeError
		switch {
		case errors.As(err, &strict):
			var keys []string
			for _, e := range strict.Errors {
				keys = append(keys, strings.Join(e.Key(), "."))
			}
			err = fmt.Errorf("unknown key(s) %s (known: root_path, sync_remove, mount_options, content_dir): %w", strings.Join(keys, ", "), strict)
		case errors.As(err, &decErr):
			row, col := decErr.Position()
			key := strings.Join(decErr.Key(), ".")
			if key != "" {
				key = " key " + key + ":"
			}
			err = fmt.Errorf("line %d column %d:%s %w", row, col, key, decErr)
		}
		return cfg, usageError{fmt.Errorf("config file %s: %w: %w", path, err, errdefs.ErrInvalidArgument)}
	}
	if err := cfg.Validate(); err != nil {
		return cfg, usageError{fmt.Errorf("config file %s: %w", path, err)}
	}
	return cfg, nil
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

func serve(ctx context.Context, o options, cfg fuseoverlayfs.Config) (err error) {
	// Caught from the start: a signal during the host check's probe mount
	// must not kill the process before it unmounts. It is acted on once
	// serving.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)
	// nerdctl's unit for this server reloads it with SIGHUP, whose default
	// action would end it: there is nothing to reload, so it is only logged.
	hups := make(chan os.Signal, 1)
	signal.Notify(hups, syscall.SIGHUP)
	defer signal.Stop(hups)

	// The same checks, with the same messages, as the built-in plugin.
	info, err := fuseoverlayfs.Check(o.root)
	if err != nil {
		return err
	}
	sn, err := fuseoverlayfs.NewSnapshotter(o.root, cfg.Opts()...)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := sn.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("close the metadata store: %w", cerr)
		}
	}()
	l, err := listen(o.socket)
	if err != nil {
		return err
	}
	if o.metricsAddr != "" {
		stopMetrics, err := serveMetrics(o.metricsAddr)
		if err != nil {
			_ = l.Close()
			return err
		}
		defer stopMetrics()
		log.G(ctx).WithField("address", o.metricsAddr).Info("serving metrics at " + metricsPath)
	}
	srv := grpc.NewServer(grpc.UnaryInterceptor(logDiffMetadata))
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))
	// One socket for both: containerd dials each proxy plugin's address
	// and shares one connection between plugins with the same address.
	diffapi.RegisterDiffServer(srv, diffServer(o.root, contentDir{o.contentDir}))

	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()

	log.G(ctx).WithFields(log.Fields{
		"socket": o.socket, "root": o.root, "content-dir": o.contentDir, "fuse-overlayfs": info.FuseOverlayfs, "version": info.Version, "open-files": info.OpenFiles,
	}).Info("serving the fuse-overlayfs snapshotter and differ")
	if _, err := os.Stat(o.contentDir); err != nil {
		// Not fatal: the server may start before containerd first creates
		// it. Every Apply will name the path it looked at.
		log.G(ctx).WithError(err).Warn("containerd's content store directory cannot be read now: layers to apply are read from there")
	}
	if _, err := daemon.SdNotify(false, daemon.SdNotifyReady); err != nil {
		log.G(ctx).WithError(err).Warn("cannot tell systemd that the service is ready")
	}

	if err := waitForStop(ctx, served, sigs, hups); err != nil {
		return fmt.Errorf("serve on %s: %w", o.socket, err)
	}
	_, _ = daemon.SdNotify(false, daemon.SdNotifyStopping)
	stopped := make(chan struct{})
	go func() {
		srv.GracefulStop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(shutdownGrace):
		log.G(ctx).Warnf("requests still running after %s: closing their connections", shutdownGrace)
		srv.Stop()
		<-stopped
	}
	// Serve returns nil after (Graceful)Stop; the listener is closed and
	// its socket file removed (dirListener.Close).
	if err := <-served; err != nil {
		return fmt.Errorf("serve on %s: %w", o.socket, err)
	}
	return nil
}

// waitForStop returns when the server stops serving on its own (with an
// error) or a stop signal arrives (nil); SIGHUP is logged and otherwise
// ignored.
func waitForStop(ctx context.Context, served <-chan error, sigs, hups <-chan os.Signal) error {
	for {
		select {
		case err := <-served:
			if err == nil {
				err = errors.New("stopped serving")
			}
			return err
		case <-hups:
			log.G(ctx).Info("SIGHUP: nothing to reload (restart the server to change its configuration)")
		case sig := <-sigs:
			log.G(ctx).WithField("signal", sig).Info("stopping")
			return nil
		}
	}
}
