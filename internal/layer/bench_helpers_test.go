package layer

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/containerd/v2/pkg/archive"
)

// benchOverLower times applying upperTar over a lower layer made from
// lowerTar, for each mode in a sub-benchmark, each iteration in a fresh
// snapshot directory snap with its upper dir: run applies it. Mode
// "containerd" first gets the lower's content in its upper (untimed), as
// containerd's extraction writes into one merged directory.
func benchOverLower(b *testing.B, ctx context.Context, lowerTar, upperTar []byte, forms *Forms, modes []string,
	run func(mode, snap, upper, lower string, upperTar []byte) error) {
	base := b.TempDir()
	lower := filepath.Join(base, "lower", "fs")
	if err := os.MkdirAll(lower, 0o755); err != nil {
		b.Fatal(err)
	}
	if err := Apply(ctx, lower, bytes.NewReader(lowerTar), Options{Forms: forms}); err != nil {
		b.Fatal(err)
	}
	for _, mode := range modes {
		b.Run(mode, func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				benchOnce(b, ctx, mode, base, lower, lowerTar, upperTar, run)
			}
		})
	}
}

// benchOnce is one iteration of benchOverLower: only run is timed.
func benchOnce(b *testing.B, ctx context.Context, mode, base, lower string, lowerTar, upperTar []byte,
	run func(mode, snap, upper, lower string, upperTar []byte) error) {
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
	if err := run(mode, snap, upper, lower, upperTar); err != nil {
		b.Fatal(err)
	}
}
