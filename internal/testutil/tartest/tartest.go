// Package tartest builds layer tars entry by entry for the tests of the root
// package, plugin/ and integration/ (whose image builder, used by the demo
// too, wraps it), in the spirit of containerd's pkg/archive/tartest: one
// builder, so each case is written once.
package tartest

import (
	"archive/tar"
	"bytes"
	"fmt"
	"path/filepath"
	"time"
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

// ModTime is the time of every entry, fixed so that an image built twice
// has the same digests.
var ModTime = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

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
			ModTime:  ModTime,
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

// Reader returns the tar stream of a layer as a reader; it panics on an
// error, which only a malformed entry written by a test can cause.
func (l Layer) Reader() *bytes.Reader {
	data, err := l.Tar()
	if err != nil {
		panic(err)
	}
	return bytes.NewReader(data)
}
