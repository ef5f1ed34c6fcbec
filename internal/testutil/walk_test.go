package testutil

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// walkTree makes a directory with a file, a symlink, a FIFO and a
// subdirectory (with an xattr larger than Tree's first buffer), and gives
// its root.
func walkTree(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for _, err := range []error{
		os.WriteFile(filepath.Join(dir, "f"), []byte("a"), 0o640),
		os.Symlink("f", filepath.Join(dir, "l")),
		unix.Mkfifo(filepath.Join(dir, "p"), 0o600),
		os.Mkdir(filepath.Join(dir, "d"), 0o751),
		unix.Lsetxattr(filepath.Join(dir, "f"), "user.keep", []byte("1"), 0),
		unix.Lsetxattr(filepath.Join(dir, "f"), "user.drop", []byte("2"), 0),
		unix.Lsetxattr(filepath.Join(dir, "d"), "user.big", []byte(strings.Repeat("b", 1000)), 0),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// TestTreeFields: each field is described when asked for and only then,
// the xattr filter picks the xattrs, SkipRoot leaves out the root.
func TestTreeFields(t *testing.T) {
	dir := walkTree(t)
	all := TreeType | TreePerm | TreeOwner | TreeSize | TreeContent | TreeLink | TreeMtimeSec | TreeTimes | TreeDev
	got, err := Tree(dir, TreeOpts{Fields: all, Xattr: func(rel, name string) bool { return name == "user.keep" || name == "user.big" }})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string][]string{
		".": {"type=40000 "},
		"f": {"type=100000 perm=640 owner=", " size=1 sha=ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb mtime=", ` xattr:user.keep="1"`},
		"l": {"type=120000 perm=777 ", " size=1 link=f atime="},
		"p": {"type=10000 perm=600 ", " mtime="},
		"d": {"type=40000 perm=751 ", ` xattr:user.big="` + strings.Repeat("b", 1000) + `"`},
	}
	if len(got) != len(want) {
		t.Errorf("%d entries, want %d: %v", len(got), len(want), got)
	}
	for p, parts := range want {
		for _, s := range parts {
			if !strings.Contains(got[p], s) {
				t.Errorf("%s: %q has no %q", p, got[p], s)
			}
		}
	}
	if strings.Contains(got["f"], "user.drop") {
		t.Errorf("filtered xattr described: %q", got["f"])
	}
	few, err := Tree(dir, TreeOpts{Fields: TreeLink | TreeMtimeSec, SkipRoot: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(few) != 4 || few["l"] != "link=f" || few["d"] != "" || !strings.HasPrefix(few["f"], "mtime=") || !strings.HasPrefix(few["p"], "mtime=") {
		t.Errorf("link targets and mtimes of files and FIFOs, no root: %v", few)
	}
}

// TestTreeDiff: a missing, a changed and an extra path each give one line.
func TestTreeDiff(t *testing.T) {
	d := TreeDiff(map[string]string{"a": "1", "b": "2", "c": "3"}, map[string]string{"a": "1", "b": "x", "e": "4"})
	want := []string{"differs b:\n\twant 2\n\tgot  x", "extra e (4)", "missing c (3)"}
	if strings.Join(d, "|") != strings.Join(want, "|") {
		t.Errorf("TreeDiff = %q, want %q", d, want)
	}
	if d := TreeDiff(map[string]string{"a": "1"}, map[string]string{"a": "1"}); len(d) != 0 {
		t.Errorf("same trees: %q", d)
	}
}
