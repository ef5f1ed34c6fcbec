package images

import (
	"archive/tar"
	"fmt"
	"math/rand"
	"strings"
)

// Bench is the benchmarks' application-like image: a small base, one big layer of
// 12,000 files (about 240 MB) and a layer that deletes files and
// directories, re-creates one, makes one opaque and adds some files.
func Bench(probe []byte, repo string) (Spec, int, int64) {
	rng := rand.New(rand.NewSource(4))
	words := make([]string, 512)
	for i := range words {
		n := 3 + rng.Intn(8)
		b := make([]byte, n)
		for j := range b {
			b[j] = byte('a' + rng.Intn(26))
		}
		words[i] = string(b)
	}
	// Text-like content, so it compresses about as much as real files do.
	text := func(size int) string {
		var sb strings.Builder
		sb.Grow(size + 16)
		for sb.Len() < size {
			sb.WriteString(words[rng.Intn(len(words))])
			if rng.Intn(12) == 0 {
				sb.WriteByte('\n')
			} else {
				sb.WriteByte(' ')
			}
		}
		return sb.String()[:size]
	}
	var files int
	var size int64
	add := func(l *Layer, path string, body string) {
		*l = append(*l, File(path, 0o644, body))
		files++
		size += int64(len(body))
	}
	baseL := Layer{
		Dir("bin", 0o755),
		{Path: "bin/probe", Type: tar.TypeReg, Mode: 0o755, Body: probe},
		Dir("etc", 0o755),
		Dir("app", 0o755),
		Dir("app/base", 0o755),
	}
	for i := 0; i < 300; i++ {
		add(&baseL, fmt.Sprintf("app/base/f%03d", i), text(2000+rng.Intn(8000)))
	}
	big := Layer{Dir("app", 0o755), Dir("app/lib", 0o755)}
	for d := 0; d < 120; d++ {
		dir := fmt.Sprintf("app/lib/pkg%03d", d)
		big = append(big, Dir(dir, 0o755))
		for i := 0; i < 100; i++ {
			add(&big, fmt.Sprintf("%s/m%03d.dat", dir, i), text(4000+rng.Intn(32000)))
		}
	}
	top := Layer{Dir("app", 0o755), Dir("app/lib", 0o755)}
	for i := 0; i < 100; i++ {
		top = append(top, Whiteout(fmt.Sprintf("app/lib/pkg%03d/m%03d.dat", i, i)))
	}
	top = append(top, Whiteout("app/lib/pkg118"), Whiteout("app/lib/pkg119"),
		Whiteout("app/lib/pkg117"), Dir("app/lib/pkg117", 0o755),
		Dir("app/lib/pkg116", 0o755), Opaque("app/lib/pkg116"))
	add(&top, "app/lib/pkg117/new.dat", text(10000))
	add(&top, "app/lib/pkg116/new.dat", text(10000))
	// A hard link within the layer (one to a lower layer's file would make
	// containerd's overlayfs fast path fail: see NOTES.md).
	top = append(top, Hardlink("app/lib/pkg116/alias.dat", "app/lib/pkg116/new.dat"))
	top = append(top, Dir("app/conf", 0o755))
	for i := 0; i < 200; i++ {
		add(&top, fmt.Sprintf("app/conf/c%03d.conf", i), text(1000+rng.Intn(20000)))
	}
	return Spec{
		Repo:   repo,
		Tag:    "1",
		Layers: []Layer{baseL, big, top},
		Cmd:    []string{ProbePath, "echo", "ok"},
	}, files, size
}
