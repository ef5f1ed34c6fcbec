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
