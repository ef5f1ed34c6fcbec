// Package tartest builds layer tars entry by entry for the tests of the root
// package, plugin/, differ/, the gRPC server, internal/layer (hostile
// entries included) and integration/ (whose image builder, used by the demo
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
	// Records are further PAX records, written as given (a global
	// header's records, for one).
	Records map[string]string
	// Devmajor and Devminor number a character or block device.
	Devmajor, Devminor int64
	// Format is the header's format; zero writes PAX. AnyFormat lets
	// archive/tar pick the first that fits (USTAR, PAX, GNU): device
	// numbers too large for PAX need GNU's base-256 fields.
	Format tar.Format
	// Verbatim writes Path as the header name as is, with no slash added
	// to a directory: hostile names, empty or ending in a slash.
	Verbatim bool
	// Raw, if set, is written into the stream as is in place of the
	// entry (the writer flushed first): input archive/tar refuses to
	// write, such as GNU sparse maps. The other fields are ignored.
	Raw []byte
}

// AnyFormat is the Entry.Format that lets archive/tar choose the header format.
const AnyFormat = tar.FormatUSTAR | tar.FormatPAX | tar.FormatGNU

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
		if err := writeEntry(tw, &buf, e); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// writeEntry writes e into the tar tw writes to buf.
func writeEntry(tw *tar.Writer, buf *bytes.Buffer, e Entry) error {
	if e.Raw != nil {
		if err := tw.Flush(); err != nil {
			return err
		}
		_, err := buf.Write(e.Raw)
		return err
	}
	hdr := e.header()
	if err := tw.WriteHeader(hdr); err != nil {
		return fmt.Errorf("tar header %q: %w", e.Path, err)
	}
	if hdr.Size > 0 {
		if _, err := tw.Write(e.Body); err != nil {
			return err
		}
	}
	return nil
}

// header is the tar header of e.
func (e Entry) header() *tar.Header {
	hdr := &tar.Header{
		Typeflag: e.Type,
		Name:     e.Path,
		Mode:     e.Mode,
		Uid:      e.UID,
		Gid:      e.GID,
		ModTime:  ModTime,
		Devmajor: e.Devmajor,
		Devminor: e.Devminor,
		Linkname: e.Link,
		Format:   e.Format,
	}
	if hdr.Format == tar.FormatUnknown {
		hdr.Format = tar.FormatPAX
	}
	switch e.Type {
	case tar.TypeReg:
		hdr.Size = int64(len(e.Body))
	case tar.TypeXGlobalHeader:
		hdr.ModTime = time.Time{} // archive/tar takes only a name and records here
	case tar.TypeDir:
		if !e.Verbatim {
			hdr.Name = e.Path + "/"
		}
	}
	if len(e.Xattrs)+len(e.Records) > 0 {
		hdr.PAXRecords = map[string]string{}
		for k, v := range e.Records {
			hdr.PAXRecords[k] = v
		}
		for k, v := range e.Xattrs {
			hdr.PAXRecords["SCHILY.xattr."+k] = v
		}
	}
	return hdr
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
