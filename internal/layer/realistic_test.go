package layer

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/pkg/archive"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// realisticLayers is a lower of a directory tree like a distribution's
// (usr/lib/python3/site-packages/pkgN/sub/...) and an upper adding files
// of a few KiB into its directories and new ones, with some hard links.
func realisticLayers(files int) [][]ent {
	body := strings.Repeat("x", 4096)
	var lower, upper []ent
	for _, d := range []string{"usr", "usr/lib", "usr/lib/python3", "usr/lib/python3/site-packages", "usr/share", "etc"} {
		lower = append(lower, dir(d))
	}
	for p := 0; p < files/40; p++ {
		pkg := fmt.Sprintf("usr/lib/python3/site-packages/pkg%d", p)
		lower = append(lower, dir(pkg), file(pkg+"/__init__.py", body[:100]))
		for s := 0; s < 4; s++ {
			sub := fmt.Sprintf("%s/sub%d", pkg, s)
			if p%2 == 0 {
				lower = append(lower, dir(sub))
			} else {
				upper = append(upper, dir(sub))
			}
			for f := 0; f < 10; f++ {
				upper = append(upper, file(fmt.Sprintf("%s/m%d.py", sub, f), body[:(f*397)%4096]))
			}
		}
		upper = append(upper, hardlink(pkg+"/link.py", pkg+"/sub0/m1.py"))
	}
	return [][]ent{lower, upper}
}

// BenchmarkRealisticLayer applies a layer of many small files over a lower
// that has most of its directories, sequentially: ours, and containerd's
// archive.Apply over the lower's content (what overlayfs's unpack does).
func BenchmarkRealisticLayer(b *testing.B) {
	testutil.RequireRoot(b)
	ctx := context.Background()
	layers := realisticLayers(12000)
	benchOverLower(b, ctx, tarBytes(b, layers[0]), tarBytes(b, layers[1]), nil, []string{"ours", "containerd"},
		func(mode, _, upper, lower string, upperTar []byte) error {
			if mode == "ours" {
				return Apply(ctx, upper, bytes.NewReader(upperTar), Options{Lowers: []string{lower}})
			}
			_, err := archive.Apply(ctx, upper, bytes.NewReader(upperTar))
			return err
		})
}
