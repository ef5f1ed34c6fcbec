// Package images builds the OCI images that the end-to-end tests and the demo
// run: layers are tar streams written here, entry by entry, so that each
// image holds exactly the cases a layer store has to get right (whiteouts,
// opaque directories, hard links across layers, special files, ...).
// HostTrees is the exception: layers of this host's own trees, archived by
// GNU tar, to check benchmark figures on an input not made here.
package images

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/fosnap/fuseoverlayfs/internal/testutil/tartest"
)

// Entry is one tar entry of a layer (tartest.Entry).
type Entry = tartest.Entry

// Layer is the list of entries of one layer, in tar order (tartest.Layer).
type Layer = tartest.Layer

// Spec describes an image.
type Spec struct {
	// Repo is the repository path in the registry, e.g. "test/features".
	Repo string
	// Tag of the image.
	Tag string
	// Layers, base first. An empty Layer is a valid (empty) layer.
	Layers []Layer
	// Tars are more layers, after Layers, given as tar archives written
	// elsewhere (HostTrees).
	Tars [][]byte
	// Entrypoint and Cmd of the image configuration.
	Entrypoint, Cmd []string
}

// The entry constructors of tartest.
var (
	Dir      = tartest.Dir
	File     = tartest.File
	Symlink  = tartest.Symlink
	Hardlink = tartest.Hardlink
	Whiteout = tartest.Whiteout
	Opaque   = tartest.Opaque
)

// Build assembles an OCI image (gzip layers) for this machine's platform.
func Build(spec Spec) (v1.Image, error) {
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	var tars [][]byte
	for i, l := range spec.Layers {
		data, err := l.Tar()
		if err != nil {
			return nil, fmt.Errorf("%s layer %d: %w", spec.Repo, i, err)
		}
		tars = append(tars, data)
	}
	var layers []v1.Layer
	for _, data := range append(tars, spec.Tars...) {
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
	cfg.Created = v1.Time{Time: tartest.ModTime}
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
