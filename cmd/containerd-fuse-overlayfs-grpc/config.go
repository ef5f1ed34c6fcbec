package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/pelletier/go-toml/v2"

	fuseoverlayfs "github.com/fosnap/fuseoverlayfs"
)

// options is the command line as given.
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

// parseArgs accepts flags before, between and after the two positional
// arguments, so that both `grpc SOCKET ROOT --config F` and
// `grpc --config F SOCKET ROOT` work.
func parseArgs(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.configPath, "config", "", "TOML `file` with the keys "+strings.Join(configKeys(), ", ")+" at its top level")
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

// serverConfig is what the server runs with: the configuration file's
// keys and the command line's, each default settled once (resolve) and
// every path absolute.
type serverConfig struct {
	// Config holds the built-in plugin's keys (root_path, sync_remove,
	// mount_options), at the file's top level.
	fuseoverlayfs.Config
	// ContentDir is containerd's content store directory,
	// <containerd root>/io.containerd.content.v1.content, from which the
	// layers containerd asks this server to apply are read: a proxied
	// Apply carries the layer's descriptor, not its bytes. Only this server
	// reads it; the field shadows the shared Config's content_dir, so the
	// file's key lands here.
	ContentDir string `toml:"content_dir"`
	// Socket and MetricsAddress come from the command line only.
	Socket         string `toml:"-"`
	MetricsAddress string `toml:"-"`
}

// configKeys lists the configuration file's keys, read from serverConfig's
// TOML tags (embedded structs included, a shadowed key once), so that help
// and errors never miss one.
func configKeys() []string {
	var keys []string
	seen := map[string]bool{}
	var walk func(t reflect.Type)
	walk = func(t reflect.Type) {
		for i := range t.NumField() {
			f := t.Field(i)
			if f.Anonymous && f.Type.Kind() == reflect.Struct {
				walk(f.Type)
				continue
			}
			key, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
			if key != "" && key != "-" && !seen[key] {
				seen[key] = true
				keys = append(keys, key)
			}
		}
	}
	walk(reflect.TypeFor[serverConfig]())
	return keys
}

// resolve reads the configuration file and settles the root, the socket
// and the content directory, making the paths absolute: fuse-overlayfs
// mount options must carry absolute paths, since containerd mounts them
// from its own working directory.
func resolve(o options) (serverConfig, error) {
	var cfg serverConfig
	if o.configPath != "" {
		var err error
		if cfg, err = loadConfig(o.configPath); err != nil {
			return cfg, err
		}
	}
	root, err := resolveRoot(o, cfg.RootPath)
	if err != nil {
		return cfg, err
	}
	contentDir, err := resolveContentDir(o, cfg.ContentDir)
	if err != nil {
		return cfg, err
	}
	cfg.Socket, cfg.MetricsAddress = o.socket, o.metricsAddr
	cfg.RootPath, cfg.ContentDir = root, contentDir
	for _, p := range []*string{&cfg.RootPath, &cfg.Socket, &cfg.ContentDir} {
		abs, err := filepath.Abs(*p)
		if err != nil {
			return cfg, err
		}
		*p = abs
	}
	return cfg, nil
}

// resolveRoot settles the snapshotter root: the argument, or root_path
// from the configuration file (fromFile), which must agree if both are
// given.
func resolveRoot(o options, fromFile string) (string, error) {
	switch {
	case o.root == "" && fromFile == "":
		return "", usageError{fmt.Errorf("the snapshotter root is missing: give it as the second argument or as root_path in the config file: %w", errdefs.ErrInvalidArgument)}
	case o.root == "":
		return fromFile, nil
	case fromFile != "" && filepath.Clean(fromFile) != filepath.Clean(o.root):
		return "", usageError{fmt.Errorf("the root argument %q and root_path %q in %s differ: give one of them: %w", o.root, fromFile, o.configPath, errdefs.ErrInvalidArgument)}
	}
	return o.root, nil
}

// resolveContentDir settles containerd's content store directory: the flag,
// or content_dir from the config file (fromFile), or the default for this
// user.
func resolveContentDir(o options, fromFile string) (string, error) {
	switch {
	case o.contentDir != "" && fromFile != "" && filepath.Clean(fromFile) != filepath.Clean(o.contentDir):
		return "", usageError{fmt.Errorf("--content-dir %q and content_dir %q in %s differ: give one of them: %w", o.contentDir, fromFile, o.configPath, errdefs.ErrInvalidArgument)}
	case o.contentDir != "":
		return o.contentDir, nil
	case fromFile != "":
		return fromFile, nil
	}
	dir, err := defaultContentDir(os.Getenv, runningRootless())
	if err != nil {
		return "", usageError{err}
	}
	return dir, nil
}

// loadConfig decodes a configuration file strictly: an unknown key (a typo
// would otherwise be ignored silently) or a value of the wrong type is an
// error naming the key.
func loadConfig(path string) (serverConfig, error) {
	var cfg serverConfig
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
			err = fmt.Errorf("unknown key(s) %s (known: %s): %w", strings.Join(keys, ", "), strings.Join(configKeys(), ", "), strict)
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
	if err := validateContentDir(cfg.ContentDir); err != nil {
		return cfg, usageError{fmt.Errorf("config file %s: %w", path, err)}
	}
	return cfg, nil
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
		return fmt.Errorf("content_dir %q: want an absolute path, e.g. /var/lib/containerd/%s: %w", dir, contentSubdir, errdefs.ErrInvalidArgument)
	}
	return nil
}
