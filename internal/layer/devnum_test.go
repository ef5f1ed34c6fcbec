package layer

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// devWidths are device numbers around the kernel's limit for one half of
// dev_t (2^12 for major, 2^20 for minor) and far past it.
func devWidths(limit int64) []int64 {
	return []int64{0, 1, limit - 1, limit, limit + 1, 1 << 20, 1<<20 + 1, 1 << 31, math.MaxUint32, 1 << 33}
}

// TestDeviceNumbers: every header device number the kernel stores as given
// is applied as given, every other one is refused as invalid before mknod.
// No nonzero header becomes a 0:0 character device (a whiteout), which a
// truncated 4096:0, 0:1048576 or 1048576:1048576 used to.
func TestDeviceNumbers(t *testing.T) {
	testutil.RequireRoot(t)
	root := newStack(t, 1).dirs[0]
	for _, typ := range []byte{tar.TypeChar, tar.TypeBlock} {
		for _, major := range devWidths(maxDevMajor) {
			for _, minor := range devWidths(maxDevMinor) {
				name := fmt.Sprintf("%c-%d-%d", typ, major, minor)
				e := ent{name: name, typ: typ, mode: 0o600}.withDev(major, minor)
				err := Apply(context.Background(), root, bytes.NewReader(tarOf(t, e)), Options{})
				fits := major < maxDevMajor && minor < maxDevMinor && (typ != tar.TypeChar || major|minor != 0)
				checkDevice(t, filepath.Join(root, name), major, minor, fits, err)
			}
		}
	}
}

// checkDevice checks one applied device entry: the node with the header's
// numbers when they fit, else an invalid-argument error naming the numbers
// and no node.
func checkDevice(t *testing.T, p string, major, minor int64, fits bool, err error) {
	t.Helper()
	var st unix.Stat_t
	serr := unix.Lstat(p, &st)
	if !fits {
		want := fmt.Sprintf("%d:%d", major, minor)
		if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), filepath.Base(p)) {
			t.Errorf("%s: got %v, want invalid argument naming the entry and %s", p, err, want)
		}
		if !errors.Is(serr, fs.ErrNotExist) {
			t.Errorf("%s: refused, yet a node is there (%v, rdev %d:%d)", p, serr, unix.Major(st.Rdev), unix.Minor(st.Rdev))
		}
		return
	}
	if err != nil || serr != nil {
		t.Fatalf("%s: apply %v, lstat %v", p, err, serr)
	}
	if int64(unix.Major(st.Rdev)) != major || int64(unix.Minor(st.Rdev)) != minor {
		t.Errorf("%s: stored as %d:%d", p, unix.Major(st.Rdev), unix.Minor(st.Rdev))
	}
	_ = os.Remove(p)
}
