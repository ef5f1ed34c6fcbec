// Package layout owns the on-disk layout of a snapshotter root and the form
// of the mounts the snapshotter hands out. The snapshotter builds both with
// it; the differ parses mounts back with it and finds the layer they name.
package layout

import (
	"path/filepath"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
)

// MountType is the type of the overlay mounts the snapshotter returns;
// containerd mounts it with the mount.fuse3 helper, which runs fuse-overlayfs.
const MountType = "fuse3.fuse-overlayfs"

// Root is a snapshotter root directory:
//
//	metadata.db              containerd's snapshot metadata store
//	empty/                   empty lower directory (ID-mapped snapshots without parent)
//	snapshots/<id>/fs/       the layer
//	snapshots/<id>/work/     fuse-overlayfs work directory (active snapshots)
//	snapshots/<id>/unpack-state.json   what a detached apply left for Commit
type Root string

// Metadata is the metadata store's file.
func (r Root) Metadata() string { return filepath.Join(string(r), "metadata.db") }

// Snapshots holds one directory per snapshot.
func (r Root) Snapshots() string { return filepath.Join(string(r), "snapshots") }

// Snapshot is the directory of snapshot id.
func (r Root) Snapshot(id string) string { return filepath.Join(r.Snapshots(), id) }

// FS is the layer directory of snapshot id.
func (r Root) FS(id string) string { return filepath.Join(r.Snapshot(id), "fs") }

// Work is the fuse-overlayfs work directory of snapshot id.
func (r Root) Work(id string) string { return filepath.Join(r.Snapshot(id), "work") }

// Empty is the lower directory of an ID-mapped active snapshot without a
// parent: fuse-overlayfs needs at least one lower directory.
func (r Root) Empty() string { return filepath.Join(string(r), "empty") }

// UnpackState is where a detached apply into the snapshot whose directory
// is snapshotDir records what Commit must finish.
func UnpackState(snapshotDir string) string {
	return filepath.Join(snapshotDir, "unpack-state.json")
}

// LayerID tells whether p is the layer directory of a snapshot of r (ids
// are decimal), and which.
func (r Root) LayerID(p string) (string, bool) {
	if p == "" || !filepath.IsAbs(p) {
		return "", false
	}
	rest, ok := strings.CutPrefix(filepath.Clean(p), r.Snapshots()+"/")
	if !ok {
		return "", false
	}
	id, fs, ok := strings.Cut(rest, "/")
	if !ok || fs != "fs" || id == "" || strings.Trim(id, "0123456789") != "" {
		return "", false
	}
	return id, true
}

// Bind is a bind mount of a layer directory.
func Bind(source string, rw bool) mount.Mount {
	mode := "ro"
	if rw {
		mode = "rw"
	}
	return mount.Mount{Type: "bind", Source: source, Options: []string{mode, "rbind"}}
}

// Overlay is a fuse-overlayfs mount of lowers (newest first) with, when
// upper is set, an upper and work directory, then the extra options.
func Overlay(lowers []string, upper, work string, extra ...string) mount.Mount {
	options := []string{"lowerdir=" + strings.Join(lowers, ":")}
	if upper != "" {
		options = append(options, "upperdir="+upper, "workdir="+work)
	}
	options = append(options, extra...)
	return mount.Mount{Type: MountType, Source: "overlay", Options: options}
}

// Mount is what a mount made by Bind or Overlay says, read back.
type Mount struct {
	Bind     bool     // a bind mount of Source
	Source   string   // the bind mount's source
	RW       bool     // a read-write bind mount
	Upper    string   // the overlay's upper directory, if any
	Work     string   // the overlay's work directory, if any
	Lowers   []string // the overlay's lower directories, newest first
	IDMapped bool     // the overlay maps IDs (uidmapping or gidmapping)
}

// Parse reads m back; ok is false for any other kind of mount.
func Parse(m mount.Mount) (Mount, bool) {
	switch m.Type {
	case "bind", "rbind":
		p := Mount{Bind: true, Source: m.Source, RW: true}
		for _, o := range m.Options {
			if o == "ro" {
				p.RW = false
			}
		}
		return p, true
	case MountType:
		var p Mount
		for _, o := range m.Options {
			k, v, _ := strings.Cut(o, "=")
			switch k {
			case "upperdir":
				p.Upper = v
			case "workdir":
				p.Work = v
			case "lowerdir":
				p.Lowers = strings.Split(v, ":")
			case "uidmapping", "gidmapping":
				p.IDMapped = true
			}
		}
		return p, true
	}
	return Mount{}, false
}
