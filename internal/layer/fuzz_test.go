package layer

import (
	"archive/tar"
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// FuzzApplyContained feeds tars with arbitrary names, link targets and
// entry types (sequential and detached, with a lower layer holding a symlink
// that points far up) and checks that nothing outside the layer directory
// is created, changed or removed, whatever Apply and Finish return.
func FuzzApplyContained(f *testing.F) {
	f.Add("esc", "../../../..", uint8(0), "esc/evil", false)
	f.Add("esc", "/", uint8(0), "esc/../../evil", true)
	f.Add("hl", "../../outside", uint8(1), "up/evil", false)
	f.Add("a/b", "../../../../../outside", uint8(0), "a/b/c/d", true)
	f.Add("d", "", uint8(2), "d/.wh..wh..opq", false)
	f.Add("up/x", "up/outside", uint8(1), ".wh.up", true)
	f.Add("../x", "x", uint8(3), "/../../y", false)
	// @SANDBOX@ stands for the absolute path of the directory around the
	// layer: a hard link to such a symlink once chmodded its target.
	f.Add("s", "@SANDBOX@", uint8(0), "x", false)
	f.Add("s", "@SANDBOX@/outside", uint8(0), "x", true)
	f.Fuzz(func(t *testing.T, name1, link1 string, typ uint8, name2 string, detached bool) {
		testutil.RequireRoot(t)
		sandbox := t.TempDir()
		link1 = strings.ReplaceAll(link1, "@SANDBOX@", sandbox)
		types := []byte{tar.TypeSymlink, tar.TypeLink, tar.TypeDir, tar.TypeReg}
		ents := []ent{
			{name: name1, link: link1, typ: types[int(typ)%len(types)], mode: 0o755},
			file(name2, "x"),
			hardlink(name2+"l", name1),
			symlink(name2+"s", link1),
			file(name2+"s/f", "y"),
		}
		data, err := tarBytesErr(ents)
		if err != nil {
			t.Skip("not encodable as a tar:", err)
		}
		lower := filepath.Join(sandbox, "snapshots", "1", "fs")
		layer := filepath.Join(sandbox, "snapshots", "2", "fs")
		for _, d := range []string{lower, layer} {
			if err := os.MkdirAll(d, 0o755); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.Symlink("../../../../..", filepath.Join(lower, "up")); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(sandbox, "outside"), []byte("secret"), 0o644); err != nil {
			t.Fatal(err)
		}
		before := tree(t, sandbox)
		ctx := context.Background()
		state := StateFile(filepath.Dir(layer))
		if detached {
			if Apply(ctx, layer, bytes.NewReader(data), Options{Detached: true, StateFile: state}) == nil {
				_ = Finish(ctx, layer, state, []string{lower})
			}
		} else {
			_ = Apply(ctx, layer, bytes.NewReader(data), Options{Lowers: []string{lower}})
		}
		after := tree(t, sandbox)
		for k, v := range after {
			if strings.HasPrefix(k, "snapshots/2/") || k == "snapshots/2/unpack-state.json" {
				continue
			}
			if before[k] != v {
				t.Errorf("outside the layer: %s changed or appeared: %s", k, v)
			}
		}
		for k := range before {
			if _, ok := after[k]; !ok {
				t.Errorf("outside the layer: %s removed", k)
			}
		}
	})
}

// TestHardLinkToSymlinkStaysInside: a hard-link entry naming a symlink
// links the symlink itself; the entry's mode must not be applied through
// it to the symlink's target outside the layer (this once made / 0644).
func TestHardLinkToSymlinkStaysInside(t *testing.T) {
	testutil.RequireRoot(t)
	sandbox := t.TempDir()
	victim := filepath.Join(sandbox, "victim")
	if err := os.Mkdir(victim, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(victim, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, detached := range []bool{false, true} {
		layer := filepath.Join(sandbox, "layer", strconv.FormatBool(detached), "fs")
		if err := os.MkdirAll(layer, 0o755); err != nil {
			t.Fatal(err)
		}
		data := tarOf(t,
			symlink("abs", victim),
			symlink("rel", "../../../victim"),
			hardlink("h1", "abs").withMode(0o600),
			hardlink("h2", "rel").withMode(0o7777),
		)
		opts := Options{}
		if detached {
			opts = Options{Detached: true, StateFile: StateFile(filepath.Dir(layer))}
		}
		if err := Apply(context.Background(), layer, bytes.NewReader(data), opts); err != nil {
			t.Fatal(err)
		}
		st, err := os.Stat(victim)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o755 || st.Mode()&(os.ModeSetuid|os.ModeSetgid|os.ModeSticky) != 0 {
			t.Fatalf("detached=%v: a hard link to a symlink changed the mode of its target outside the layer to %v", detached, st.Mode())
		}
	}
}
