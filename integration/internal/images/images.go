// Package images builds the OCI images that the end-to-end tests and the demo
// run: layers are tar streams written here, entry by entry, so that each
// image holds exactly the cases a layer store has to get right (whiteouts,
// opaque directories, hard links across layers, special files, ...).
package images

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Entry is one tar entry of a layer.
type Entry struct {
	// Path inside the image, without a leading slash.
	Path string
	// Type is a tar type flag (tar.TypeReg, tar.TypeDir, tar.TypeSymlink,
	// tar.TypeLink, tar.TypeFifo...).
	Type byte
	// Mode holds the permission bits, setuid/setgid/sticky included.
	Mode int64
	// UID and GID own the entry.
	UID, GID int
	// Body is a regular file's content.
	Body []byte
	// Link is a symlink's target or, for a hard link, the linked path
	// inside the image (without a leading slash).
	Link string
	// Xattrs are extended attributes, stored as PAX records.
	Xattrs map[string]string
}

// Layer is the list of entries of one layer, in tar order.
type Layer []Entry

// Spec describes an image.
type Spec struct {
	// Repo is the repository path in the registry, e.g. "test/features".
	Repo string
	// Tag of the image.
	Tag string
	// Layers, base first. An empty Layer is a valid (empty) layer.
	Layers []Layer
	// Entrypoint and Cmd of the image configuration.
	Entrypoint, Cmd []string
}

// modTime is fixed so that an image built twice has the same digests.
var modTime = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

// Dir returns a directory entry.
func Dir(path string, mode int64) Entry { return Entry{Path: path, Type: tar.TypeDir, Mode: mode} }

// File returns a regular file entry owned by root.
func File(path string, mode int64, body string) Entry {
	return Entry{Path: path, Type: tar.TypeReg, Mode: mode, Body: []byte(body)}
}

// Symlink returns a symbolic link entry.
func Symlink(path, target string) Entry {
	return Entry{Path: path, Type: tar.TypeSymlink, Mode: 0o777, Link: target}
}

// Hardlink returns a hard link entry to target (a path in the image).
func Hardlink(path, target string) Entry {
	return Entry{Path: path, Type: tar.TypeLink, Mode: 0o644, Link: target}
}

// Whiteout returns the OCI whiteout entry that deletes path in lower layers.
func Whiteout(path string) Entry {
	return File(filepath.Join(filepath.Dir(path), ".wh."+filepath.Base(path)), 0o644, "")
}

// Opaque returns the OCI entry that hides everything lower layers put in dir.
func Opaque(dir string) Entry {
	return File(filepath.Join(dir, ".wh..wh..opq"), 0o644, "")
}

// Tar returns the uncompressed tar stream of a layer.
func (l Layer) Tar() ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range l {
		hdr := &tar.Header{
			Typeflag: e.Type,
			Name:     e.Path,
			Mode:     e.Mode,
			Uid:      e.UID,
			Gid:      e.GID,
			ModTime:  modTime,
			Format:   tar.FormatPAX,
		}
		switch e.Type {
		case tar.TypeReg:
			hdr.Size = int64(len(e.Body))
		case tar.TypeDir:
			hdr.Name = e.Path + "/"
		case tar.TypeSymlink, tar.TypeLink:
			hdr.Linkname = e.Link
		}
		if len(e.Xattrs) > 0 {
			hdr.PAXRecords = map[string]string{}
			for k, v := range e.Xattrs {
				hdr.PAXRecords["SCHILY.xattr."+k] = v
			}
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, fmt.Errorf("tar header %s: %w", e.Path, err)
		}
		if e.Type == tar.TypeReg {
			if _, err := tw.Write(e.Body); err != nil {
				return nil, err
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// Build assembles an OCI image (gzip layers) for this machine's platform.
func Build(spec Spec) (v1.Image, error) {
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	var layers []v1.Layer
	for i, l := range spec.Layers {
		data, err := l.Tar()
		if err != nil {
			return nil, fmt.Errorf("%s layer %d: %w", spec.Repo, i, err)
		}
		layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
			return io.NopCloser(bytes.NewReader(data)), nil
		}, tarball.WithMediaType(types.OCILayer))
		if err != nil {
			return nil, err
		}
		layers = append(layers, layer)
	}
	img, err := mutate.AppendLayers(img, layers...)
	if err != nil {
		return nil, err
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cfg = cfg.DeepCopy()
	cfg.OS = "linux"
	cfg.Architecture = runtime.GOARCH
	cfg.Created = v1.Time{Time: modTime}
	cfg.Config.Env = []string{"PATH=/bin"}
	cfg.Config.Entrypoint = spec.Entrypoint
	cfg.Config.Cmd = spec.Cmd
	return mutate.ConfigFile(img, cfg)
}

// Ref returns the image's reference in the registry at addr (host:port).
func (s Spec) Ref(addr string) string { return addr + "/" + s.Repo + ":" + s.Tag }

// Push builds the image and pushes it to the plain-HTTP registry at addr.
func Push(addr string, spec Spec) (string, error) {
	img, err := Build(spec)
	if err != nil {
		return "", err
	}
	ref := spec.Ref(addr)
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		return "", err
	}
	if err := remote.Write(r, img); err != nil {
		return "", fmt.Errorf("push %s: %w", ref, err)
	}
	return ref, nil
}

// WriteOCIArchive builds the image and writes it as an OCI image layout tar
// archive (what `ctr images import` reads), naming it ref.
func WriteOCIArchive(path, ref string, spec Spec) error {
	img, err := Build(spec)
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp(filepath.Dir(path), "oci-layout-")
	if err != nil {
		return err
	}
	defer func() { _ = os.RemoveAll(dir) }()
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return err
	}
	err = p.AppendImage(img, layout.WithAnnotations(map[string]string{
		"io.containerd.image.name":          ref,
		"org.opencontainers.image.ref.name": spec.Tag,
	}))
	if err != nil {
		return err
	}
	return tarDir(dir, path)
}

// tarDir writes the files below dir into a tar archive at path.
func tarDir(dir, path string) error {
	out, err := os.Create(path)
	if err != nil {
		return err
	}
	tw := tar.NewWriter(out)
	err = filepath.Walk(dir, func(p string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil || rel == "." {
			return err
		}
		hdr, err := tar.FileInfoHeader(info, "")
		if err != nil {
			return err
		}
		hdr.Name = filepath.ToSlash(rel)
		if info.IsDir() {
			hdr.Name += "/"
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if info.Mode().IsRegular() {
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			defer func() { _ = f.Close() }()
			if _, err := io.Copy(tw, f); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		_ = out.Close()
		return err
	}
	if err := tw.Close(); err != nil {
		_ = out.Close()
		return err
	}
	return out.Close()
}
