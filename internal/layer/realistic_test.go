package layer

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
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
	lowerTar, upperTar := tarBytes(b, layers[0]), tarBytes(b, layers[1])
	base := b.TempDir()
	lower := filepath.Join(base, "lower", "fs")
	if err := os.MkdirAll(lower, 0o755); err != nil {
		b.Fatal(err)
	}
	if err := Apply(ctx, lower, bytes.NewReader(lowerTar), Options{}); err != nil {
		b.Fatal(err)
	}
	for _, mode := range []string{"ours", "containerd"} {
		b.Run(mode, func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				realisticOnce(b, ctx, mode, base, lower, lowerTar, upperTar)
			}
		})
	}
}

// realisticOnce applies upperTar once over the lower: ours in a layer of
// its own, containerd's archive.Apply in a copy of the lower's content.
func realisticOnce(b *testing.B, ctx context.Context, mode, base, lower string, lowerTar, upperTar []byte) {
	b.StopTimer()
	snap, err := os.MkdirTemp(base, "upper-")
	if err != nil {
		b.Fatal(err)
	}
	defer func() {
		b.StopTimer()
		if err := os.RemoveAll(snap); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}()
	upper := filepath.Join(snap, "fs")
	if err := os.Mkdir(upper, 0o755); err != nil {
		b.Fatal(err)
	}
	if mode == "containerd" {
		if _, err := archive.Apply(ctx, upper, bytes.NewReader(lowerTar)); err != nil {
			b.Fatal(err)
		}
	}
	b.StartTimer()
	if mode == "ours" {
		err = Apply(ctx, upper, bytes.NewReader(upperTar), Options{Lowers: []string{lower}})
	} else {
		_, err = archive.Apply(ctx, upper, bytes.NewReader(upperTar))
	}
	if err != nil {
		b.Fatal(err)
	}
}
