package tartest

import (
	"archive/tar"
	"errors"
	"io"
	"testing"
)

// TestLayerTar reads back what Tar writes: names (directories with a
// trailing slash, whiteouts as .wh. files), types, bodies, link targets,
// owners and xattrs as PAX records.
func TestLayerTar(t *testing.T) {
	d := Dir("d", 0o755)
	d.UID, d.GID = 7, 8
	f := File("d/f", 0o600, "body")
	f.Xattrs = map[string]string{"user.k": "v"}
	tr := tar.NewReader(Layer{d, f, Hardlink("d/h", "d/f"), Symlink("d/s", "f"), Whiteout("d/gone"), Opaque("d")}.Reader())
	want := []struct {
		name string
		typ  byte
		link string
	}{{"d/", tar.TypeDir, ""}, {"d/f", tar.TypeReg, ""}, {"d/h", tar.TypeLink, "d/f"}, {"d/s", tar.TypeSymlink, "f"}, {"d/.wh.gone", tar.TypeReg, ""}, {"d/.wh..wh..opq", tar.TypeReg, ""}}
	for i, w := range want {
		h, err := tr.Next()
		if err != nil {
			t.Fatalf("entry %d: %v", i, err)
		}
		if h.Name != w.name || h.Typeflag != w.typ || h.Linkname != w.link || !h.ModTime.Equal(ModTime) {
			t.Errorf("entry %d: %s %c %q %v, want %s %c %q", i, h.Name, h.Typeflag, h.Linkname, h.ModTime, w.name, w.typ, w.link)
		}
		switch i {
		case 0:
			if h.Uid != 7 || h.Gid != 8 {
				t.Errorf("owner %d:%d, want 7:8", h.Uid, h.Gid)
			}
		case 1:
			body, _ := io.ReadAll(tr)
			if string(body) != "body" || h.PAXRecords["SCHILY.xattr.user.k"] != "v" {
				t.Errorf("file body %q, records %v", body, h.PAXRecords)
			}
		}
	}
	if _, err := tr.Next(); !errors.Is(err, io.EOF) {
		t.Fatalf("more entries than written: %v", err)
	}
}

// TestEntryFields reads back the fields the hostile tests use: device
// numbers (GNU base-256 with AnyFormat), a verbatim directory name, PAX
// records, and raw bytes written as they are between entries.
func TestEntryFields(t *testing.T) {
	big := Entry{Path: "dev", Type: tar.TypeChar, Mode: 0o600, Devmajor: 1 << 33, Devminor: 5, Format: AnyFormat}
	if _, err := (Layer{{Path: "dev", Type: tar.TypeChar, Devmajor: 1 << 33}}).Tar(); err == nil {
		t.Error("a device number too large for PAX written in PAX: no error")
	}
	raw, err := Layer{File("r", 0o644, "raw")}.Tar()
	if err != nil {
		t.Fatal(err)
	}
	raw = raw[:1024] // the header and body blocks, not the end of the archive
	l := Layer{big, {Path: "d//", Type: tar.TypeDir, Mode: 0o755, Verbatim: true},
		{Path: "g", Type: tar.TypeXGlobalHeader, Records: map[string]string{"comment": "c"}},
		{Raw: raw}, File("after", 0o644, "")}
	tr := tar.NewReader(l.Reader())
	want := []string{"dev", "d//", "g", "r", "after"}
	for i, w := range want {
		h, err := tr.Next()
		if err != nil {
			t.Fatalf("entry %d: %v", i, err)
		}
		if h.Name != w {
			t.Errorf("entry %d named %q, want %q", i, h.Name, w)
		}
		switch i {
		case 0:
			if h.Devmajor != 1<<33 || h.Devminor != 5 || h.Format != tar.FormatGNU {
				t.Errorf("device %d:%d in %v, want %d:5 in GNU", h.Devmajor, h.Devminor, h.Format, int64(1<<33))
			}
		case 2:
			if h.PAXRecords["comment"] != "c" {
				t.Errorf("global records %v, want comment=c", h.PAXRecords)
			}
		case 3:
			if body, _ := io.ReadAll(tr); string(body) != "raw" {
				t.Errorf("raw entry body %q, want raw", body)
			}
		}
	}
	if _, err := tr.Next(); !errors.Is(err, io.EOF) {
		t.Fatalf("more entries than written: %v", err)
	}
}
