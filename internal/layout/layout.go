// Package layout owns the on-disk layout of a snapshotter root and the form
// of the mounts the snapshotter hands out. The snapshotter builds both with
// it; the differ parses mounts back with it and finds the layer they name.
package layout

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
)

// MountType is the type of the overlay mounts the snapshotter returns;
// containerd mounts it with the mount.fuse3 helper, which runs fuse-overlayfs.
const MountType = "fuse3.fuse-overlayfs"

// FSType is how the kernel lists a mount served by fuse-overlayfs in
// /proc/self/mountinfo.
const FSType = "fuse.fuse-overlayfs"

// ServerComm is the command name (/proc/PID/comm, and the base name of
// argv[0]) of a process serving a fuse-overlayfs mount.
const ServerComm = "fuse-overlayfs"

// ProbePrefix starts the names of the host checks' temporary directories in
// a root; the recovery at open removes those an interrupted check left.
const ProbePrefix = ".probe-"

// newPrefix starts the name of a snapshot directory being created, before
// it is renamed to its ID.
const newPrefix = "new-"

// Root is a snapshotter root directory:
//
//	metadata.db              containerd's snapshot metadata store
//	empty/                   empty lower directory (ID-mapped snapshots without parent)
//	snapshots/<id>/fs/       the layer
//	snapshots/<id>/work/     fuse-overlayfs work directory (active snapshots)
//	snapshots/<id>/unpack-state.json   what a detached apply left for Commit
//	snapshots/new-*/         a snapshot being created (renamed to <id> once stored)
//	.probe-*/                a host check's probe (removed at open when left)
type Root string

// Probes is the glob pattern of the probe directories in r.
func (r Root) Probes() string { return filepath.Join(string(r), ProbePrefix+"*") }

// NewSnapshotPattern is the os.MkdirTemp pattern of a snapshot directory
// being created, in Snapshots.
const NewSnapshotPattern = newPrefix

// LayerIn is the layer directory inside the snapshot directory dir (one in
// place, or one being created).
func LayerIn(dir string) string { return filepath.Join(dir, "fs") }

// WorkIn is the work directory inside the snapshot directory dir.
func WorkIn(dir string) string { return filepath.Join(dir, "work") }

// Metadata is the metadata store's file.
func (r Root) Metadata() string { return filepath.Join(string(r), "metadata.db") }

// Snapshots holds one directory per snapshot.
func (r Root) Snapshots() string { return filepath.Join(string(r), "snapshots") }

// Snapshot is the directory of snapshot id.
func (r Root) Snapshot(id string) string { return filepath.Join(r.Snapshots(), id) }

// FS is the layer directory of snapshot id.
func (r Root) FS(id string) string { return LayerIn(r.Snapshot(id)) }

// Work is the fuse-overlayfs work directory of snapshot id.
func (r Root) Work(id string) string { return WorkIn(r.Snapshot(id)) }

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

// Parse reads m back; ok is false for any other kind of mount. An overlay
// mount is read as the mount helper will see it: mount.fuse3 and
// fuse-overlayfs get its options joined with commas, so an option element
// holding a comma (or a backslash, which libfuse reads as an escape) would
// smuggle in another option, and fuse-overlayfs takes the last of a repeated
// one. Parse therefore refuses, with errdefs.ErrInvalidArgument, any overlay
// option that is not one Overlay writes: such elements, repeated keys, keys
// Overlay never sets, directories that are not absolute clean paths, and ID
// mappings that are not digits and ':'.
func Parse(m mount.Mount) (Mount, bool, error) {
	switch m.Type {
	case "bind", "rbind":
		p := Mount{Bind: true, Source: m.Source, RW: true}
		for _, o := range m.Options {
			if o == "ro" {
				p.RW = false
			}
		}
		return p, true, nil
	case MountType:
		p, err := parseOverlay(m.Options)
		return p, true, err
	}
	return Mount{}, false, nil
}

func parseOverlay(options []string) (Mount, error) {
	var p Mount
	seen := make(map[string]bool, len(options))
	for _, o := range options {
		k, v, _ := strings.Cut(o, "=")
		err := checkElement(o)
		if err == nil && seen[k] {
			err = errors.New("given twice; fuse-overlayfs would take the last")
		}
		if err == nil {
			err = p.set(k, v, o)
		}
		if err != nil {
			return Mount{}, fmt.Errorf("parse fuse-overlayfs mount option %q: %w: %w (only the options the snapshotter writes are accepted)", o, errdefs.ErrInvalidArgument, err)
		}
		seen[k] = true
	}
	if !seen["lowerdir"] {
		return Mount{}, fmt.Errorf("parse fuse-overlayfs mount: no lowerdir: %w", errdefs.ErrInvalidArgument)
	}
	if seen["upperdir"] != seen["workdir"] {
		return Mount{}, fmt.Errorf("parse fuse-overlayfs mount: upperdir and workdir go together: %w", errdefs.ErrInvalidArgument)
	}
	return p, nil
}

// set records option o (key k, value v) in p.
func (p *Mount) set(k, v, o string) error {
	var err error
	switch k {
	case "upperdir":
		p.Upper, err = v, checkDir(v)
	case "workdir":
		p.Work, err = v, checkDir(v)
	case "lowerdir":
		p.Lowers = strings.Split(v, ":")
		for _, l := range p.Lowers {
			if err == nil {
				err = checkDir(l)
			}
		}
	case "uidmapping", "gidmapping":
		p.IDMapped = true
		if v == "" || strings.Trim(v, "0123456789:") != "" {
			err = errors.New("an ID mapping is digits and ':'")
		}
	default:
		err = CheckExtraOption(o)
	}
	return err
}

// checkElement refuses what mount.fuse3 or fuse-overlayfs would read as
// more than one option, or as an escape.
func checkElement(o string) error {
	for _, c := range o {
		switch {
		case c == ',':
			return errors.New("',' separates options: the mount helper would read more than one")
		case c == '\\':
			return errors.New("libfuse reads a backslash as an escape")
		case c < 0x20 || c == 0x7f || c == ' ':
			return errors.New("contains a space or control character")
		}
	}
	return nil
}

// checkDir refuses a directory option that Overlay cannot have written:
// not absolute, not clean ("..", "//", a trailing "/"), or holding ':',
// which separates lower directories.
func checkDir(p string) error {
	switch {
	case !filepath.IsAbs(p):
		return fmt.Errorf("directory %q is not absolute", p)
	case filepath.Clean(p) != p:
		return fmt.Errorf("directory %q is not a clean path", p)
	case strings.ContainsRune(p, ':'):
		return fmt.Errorf("directory %q holds ':'", p)
	}
	return nil
}

// reservedOptions are set by the snapshotter itself (letting a user set them
// would point a mount at another snapshot's data or fake an ID mapping), or
// would make fuse-overlayfs or its mount helper run code or change user:
// fuse-overlayfs loads plugins=, mount.fuse3 honours setuid= and
// drop_privileges.
var reservedOptions = map[string]bool{
	"lowerdir":        true,
	"upperdir":        true,
	"workdir":         true,
	"uidmapping":      true,
	"gidmapping":      true,
	"plugins":         true,
	"setuid":          true,
	"drop_privileges": true,
}

// CheckExtraOption checks one extra fuse-overlayfs option, as configured for
// the snapshotter and as read back by Parse: a single option (no ',' that
// would smuggle in more, no backslash escape), with a non-empty key made of
// letters, digits, '_' and '-', no control characters or spaces, and not
// one the snapshotter sets itself or that runs code.
func CheckExtraOption(o string) error {
	if o == "" {
		return errors.New("empty option")
	}
	if err := checkElement(o); err != nil {
		return err
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
		return fmt.Errorf("%s is set by the snapshotter or runs code, and cannot be given", key)
	}
	return nil
}
