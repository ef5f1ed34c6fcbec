//go:build linux

package plugin

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	srvconfig "github.com/containerd/containerd/v2/cmd/containerd/server/config"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/plugins"
	"github.com/containerd/errdefs"
	"github.com/containerd/plugin"

	fuseoverlayfs "github.com/fosnap/fuseoverlayfs"
	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

const pluginKey = "io.containerd.snapshotter.v1.fuse-overlayfs"

// decode reads a containerd config file the way containerd does and decodes
// our section of it.
func decode(t *testing.T, snippet string) (*fuseoverlayfs.Config, error) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(path, []byte(snippet), 0o600); err != nil {
		t.Fatal(err)
	}
	var cfg srvconfig.Config
	if err := srvconfig.LoadConfig(context.Background(), path, &cfg); err != nil {
		return nil, err
	}
	out, err := cfg.Decode(context.Background(), pluginKey, &fuseoverlayfs.Config{})
	if err != nil {
		return nil, err
	}
	return out.(*fuseoverlayfs.Config), nil
}

func TestConfigDecode(t *testing.T) {
	cfg, err := decode(t, `version = 3
[plugins.'io.containerd.snapshotter.v1.fuse-overlayfs']
  root_path = "/var/lib/fo"
  sync_remove = true
  mount_options = ["noacl", "static_nlink"]
`)
	if err != nil {
		t.Fatal(err)
	}
	want := fuseoverlayfs.Config{RootPath: "/var/lib/fo", SyncRemove: true, MountOptions: []string{"noacl", "static_nlink"}}
	if cfg.RootPath != want.RootPath || cfg.SyncRemove != want.SyncRemove || !slices.Equal(cfg.MountOptions, want.MountOptions) {
		t.Fatalf("decoded %+v, want %+v", cfg, want)
	}
	// No section: defaults.
	cfg, err = decode(t, "version = 3\n")
	if err != nil || cfg.RootPath != "" || cfg.SyncRemove || cfg.MountOptions != nil {
		t.Fatalf("defaults: %+v %v", cfg, err)
	}
	// A value of the wrong type is an error, not a silent default.
	if _, err := decode(t, `version = 3
[plugins.'io.containerd.snapshotter.v1.fuse-overlayfs']
  sync_remove = "yes"
`); err == nil {
		t.Fatal("sync_remove = \"yes\" was accepted")
	}
	if _, err := decode(t, `version = 3
[plugins.'io.containerd.snapshotter.v1.fuse-overlayfs']
  mount_options = "noacl"
`); err == nil {
		t.Fatal("mount_options as a string was accepted")
	}
}

func newInitContext(t *testing.T, cfg *fuseoverlayfs.Config) *plugin.InitContext {
	root := filepath.Join(t.TempDir(), "containerd-root", pluginKey)
	ic := plugin.NewContext(context.Background(), plugin.NewPluginSet(), map[string]string{plugins.PropertyRootDir: root})
	ic.Config = cfg
	return ic
}

func TestInitSkipsWithoutFuseOverlayfs(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	_, err := initSnapshotter(newInitContext(t, &fuseoverlayfs.Config{}))
	if !errors.Is(err, plugin.ErrSkipPlugin) {
		t.Fatalf("got %v, want ErrSkipPlugin", err)
	}
	if !strings.Contains(err.Error(), "fuse-overlayfs was not found on PATH") || !strings.Contains(err.Error(), "apt-get install fuse-overlayfs") {
		t.Fatalf("message does not say what to install: %v", err)
	}
	if !errors.Is(err, exec.ErrNotFound) || !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("error %v lost its cause (exec.ErrNotFound) or class (failed precondition)", err)
	}
}

func TestInitRefusesBadConfig(t *testing.T) {
	_, err := initSnapshotter(newInitContext(t, &fuseoverlayfs.Config{MountOptions: []string{"noacl,upperdir=/"}}))
	if !errdefs.IsInvalidArgument(err) || errors.Is(err, plugin.ErrSkipPlugin) {
		t.Fatalf("got %v, want an invalid-argument error", err)
	}
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := initSnapshotter(newInitContext(t, &fuseoverlayfs.Config{RootPath: file})); err == nil {
		t.Fatal("a root_path that is a file was accepted")
	}
}

func TestInit(t *testing.T) {
	testutil.RequireFUSE(t)
	ic := newInitContext(t, &fuseoverlayfs.Config{MountOptions: []string{"noacl"}})
	sn, err := initSnapshotter(ic)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sn.(snapshots.Snapshotter).Close() })
	if _, ok := sn.(snapshots.Cleaner); !ok {
		t.Fatal("snapshotter does not implement snapshots.Cleaner")
	}
	root := ic.Properties[plugins.PropertyRootDir]
	if ic.Meta.Exports[plugins.SnapshotterRootDir] != root {
		t.Fatalf("exported root %q, want %q", ic.Meta.Exports[plugins.SnapshotterRootDir], root)
	}
	if !slices.Contains(ic.Meta.Capabilities, "remap-ids") {
		t.Fatalf("capabilities %v lack remap-ids", ic.Meta.Capabilities)
	}
	if len(ic.Meta.Platforms) == 0 {
		t.Fatal("no platform advertised")
	}
	if _, err := sn.(snapshots.Snapshotter).Prepare(context.Background(), "k", ""); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "metadata.db")); err != nil {
		t.Fatal(err)
	}
	testutil.RequireNoLeftovers(t, root)

	// root_path overrides containerd's directory.
	other := filepath.Join(t.TempDir(), "elsewhere")
	ic = newInitContext(t, &fuseoverlayfs.Config{RootPath: other})
	sn2, err := initSnapshotter(ic)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sn2.(snapshots.Snapshotter).Close() })
	if ic.Meta.Exports[plugins.SnapshotterRootDir] != other {
		t.Fatalf("root_path ignored: %v", ic.Meta.Exports)
	}
}

// TestInitSkipsOnHeldRoot loads the plugin on a root another opener holds:
// the load must end (not hang on the metadata store's lock) in a skip, since
// a failed snapshotter would take containerd's metadata plugin down with it,
// and keep the class errdefs.ErrUnavailable and the message.
func TestInitSkipsOnHeldRoot(t *testing.T) {
	testutil.RequireFUSE(t)
	ic := newInitContext(t, &fuseoverlayfs.Config{})
	root := ic.Properties[plugins.PropertyRootDir]
	holder, err := fuseoverlayfs.NewSnapshotter(root)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = holder.Close() })
	sn, err := initSnapshotter(ic)
	if err == nil {
		_ = sn.(snapshots.Snapshotter).Close()
		t.Fatal("the plugin loaded on a root another opener holds")
	}
	if !errors.Is(err, plugin.ErrSkipPlugin) || !errdefs.IsUnavailable(err) {
		t.Errorf("got %v, want ErrSkipPlugin and class unavailable", err)
	}
	if want := "snapshotter root " + root + " is in use by another process"; !strings.Contains(err.Error(), want) {
		t.Errorf("message %q lacks %q", err, want)
	}
	testutil.RequireNoLeftovers(t, root)
}
