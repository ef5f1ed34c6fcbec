package images

import (
	"archive/tar"
	"fmt"
)

// ProbePath is where every image built here keeps the probe program
// (integration/cmd/probe).
const ProbePath = "/bin/probe"

func base(probe []byte) Layer {
	return Layer{
		Dir("bin", 0o755),
		{Path: "bin/probe", Type: tar.TypeReg, Mode: 0o755, Body: probe},
	}
}

// Features is an image whose layers hold every case the snapshotter's layer
// store must reproduce: files deleted by whiteouts, a directory deleted and
// re-created, a directory made opaque, hard links within and across layers,
// absolute, relative and dangling symlinks, xattrs, setuid, setgid and
// sticky bits, a FIFO, empty layers, files owned by other users, metadata-only
// changes and type changes.
func Features(probe []byte) Spec {
	l1 := append(base(probe),
		File("layer1.txt", 0o644, "from layer 1\n"),
		Dir("data", 0o755),
		File("data/keep", 0o644, "keep v1\n"),
		File("data/deleted", 0o644, "deleted in layer 3\n"),
		Dir("data/d1", 0o755),
		File("data/d1/old", 0o644, "old d1, gone once d1 is re-created\n"),
		Dir("data/d2", 0o755),
		File("data/d2/old", 0o644, "old d2, hidden by the opaque marker\n"),
		Dir("data/d2/sub", 0o755),
		File("data/d2/sub/oldsub", 0o644, "hidden too\n"),
		Dir("data/hard", 0o755),
		File("data/hard/a", 0o644, "hard-linked content\n"),
		Hardlink("data/hard/b", "data/hard/a"),
		File("data/lowerfile", 0o644, "linked from an upper layer\n"),
		Dir("data/sym", 0o755),
		Symlink("data/sym/abs", "/data/keep"),
		Symlink("data/sym/rel", "../keep"),
		Symlink("data/sym/dangling", "/nonexistent/target"),
		Symlink("data/sym/dirlink", "../hard"),
		Dir("data/modes", 0o755),
		File("data/modes/setuid", 0o4755, "setuid\n"),
		File("data/modes/setgid", 0o2755, "setgid\n"),
		File("data/modes/chmod-later", 0o600, "mode changes in layer 3\n"),
		Dir("data/modes/sticky", 0o1777),
		Dir("data/modes/setgid-dir", 0o2775),
		Entry{Path: "data/fifo", Type: tar.TypeFifo, Mode: 0o640},
		Entry{Path: "data/owned", Type: tar.TypeDir, Mode: 0o750, UID: 2000, GID: 3000},
		Entry{Path: "data/owned/file", Type: tar.TypeReg, Mode: 0o640, UID: 1234, GID: 5678, Body: []byte("owned by 1234:5678\n")},
		Entry{Path: "data/owned/nobody", Type: tar.TypeReg, Mode: 0o600, UID: 65534, GID: 65534, Body: []byte("nobody\n")},
		Entry{Path: "data/xattr", Type: tar.TypeDir, Mode: 0o755, Xattrs: map[string]string{"user.dir": "on a directory"}},
		Entry{Path: "data/xattr/file", Type: tar.TypeReg, Mode: 0o644, Body: []byte("xattrs\n"),
			Xattrs: map[string]string{"user.test": "hello", "user.second": "with space"}},
		File("data/replace-me", 0o644, "a file, a directory from layer 5 on\n"),
		Symlink("data/sym-replace", "keep"),
		Dir("data/gone-tree", 0o755),
		Dir("data/gone-tree/sub", 0o755),
		File("data/gone-tree/sub/f", 0o644, "removed with its tree in layer 6\n"),
	)
	l3 := Layer{
		File("layer3.txt", 0o644, "from layer 3\n"),
		Dir("data", 0o755),
		Whiteout("data/deleted"),
		// d1 deleted and re-created in the same layer.
		Whiteout("data/d1"),
		Dir("data/d1", 0o700),
		File("data/d1/new", 0o644, "new d1\n"),
		// d2 made opaque: its lower content is hidden, new content added.
		Dir("data/d2", 0o755),
		Opaque("data/d2"),
		File("data/d2/new", 0o644, "new d2\n"),
		// Hard links to a file that exists only in a lower layer.
		Hardlink("data/crosslink", "data/lowerfile"),
		Dir("data/hard", 0o755),
		Hardlink("data/hard/c", "data/hard/a"),
		File("data/keep", 0o644, "keep v3\n"),
		Dir("data/modes", 0o755),
		File("data/modes/chmod-later", 0o644, "mode changes in layer 3\n"),
		Entry{Path: "data/owned", Type: tar.TypeDir, Mode: 0o750, UID: 2000, GID: 3000},
		Entry{Path: "data/owned/file", Type: tar.TypeReg, Mode: 0o640, UID: 4321, GID: 8765, Body: []byte("owned by 1234:5678\n")},
	}
	l5 := Layer{
		File("layer5.txt", 0o644, "from layer 5\n"),
		Dir("data", 0o755),
		Entry{Path: "data/xattr/file", Type: tar.TypeReg, Mode: 0o644, Body: []byte("xattrs\n"),
			Xattrs: map[string]string{"user.test": "changed", "user.added": "new"}},
		Whiteout("data/replace-me"),
		Dir("data/replace-me", 0o755),
		File("data/replace-me/inside", 0o644, "now inside a directory\n"),
		Whiteout("data/sym-replace"),
		File("data/sym-replace", 0o644, "a file, was a symlink\n"),
		Dir("data/d2", 0o755),
		File("data/d2/later", 0o644, "added over the opaque directory\n"),
		Dir("data/newdir", 0o755),
		Dir("data/newdir/deep", 0o711),
		File("data/newdir/deep/file", 0o444, "deep\n"),
	}
	l6 := Layer{
		File("layer6.txt", 0o644, "from layer 6\n"),
		Dir("data", 0o755),
		Whiteout("data/gone-tree"),
		Dir("data/d1", 0o700),
		Whiteout("data/d1/new"),
		File("data/d1/newer", 0o644, "newer d1\n"),
	}
	return Spec{
		Repo:   "test/features",
		Tag:    "1",
		Layers: []Layer{l1, {}, l3, {}, l5, l6},
		Cmd:    []string{ProbePath, "cat", "/layer1.txt", "/layer3.txt", "/layer5.txt", "/layer6.txt"},
	}
}

// Many is an image of n layers (n >= 2): each adds a file, overwrites a
// shared one, every tenth deletes an earlier file and every 25th is empty.
func Many(probe []byte, n int) Spec {
	layers := []Layer{append(base(probe), Dir("many", 0o755), File("counter", 0o644, "0\n"))}
	for i := 1; i < n; i++ {
		if i%25 == 0 {
			layers = append(layers, Layer{})
			continue
		}
		l := Layer{
			Dir("many", 0o755),
			File(fmt.Sprintf("many/%03d", i), 0o644, fmt.Sprintf("layer %d\n", i)),
			File("counter", 0o644, fmt.Sprintf("%d\n", i)),
		}
		if i%10 == 0 {
			l = append(l, Whiteout(fmt.Sprintf("many/%03d", i-5)))
		}
		layers = append(layers, l)
	}
	return Spec{
		Repo:   "test/many",
		Tag:    fmt.Sprint(n),
		Layers: layers,
		Cmd:    []string{ProbePath, "cat", "/counter"},
	}
}

// Pause is a pod sandbox image: its entrypoint waits for the stop signal.
func Pause(probe []byte) Spec {
	return Spec{
		Repo:       "test/pause",
		Tag:        "1",
		Layers:     []Layer{base(probe)},
		Entrypoint: []string{ProbePath, "pause"},
	}
}

// Demo is the small image of `make demo`: three layers, each holding a
// line of text; the container prints them and waits to be stopped.
func Demo(probe []byte) Spec {
	return Spec{
		Repo: "demo/hello",
		Tag:  "1",
		Layers: []Layer{
			append(base(probe), Dir("layers", 0o755),
				File("layers/1.txt", 0o644, "layer 1: the probe program and this line\n")),
			{Dir("layers", 0o755), File("layers/2.txt", 0o644, "layer 2: hello from the middle layer\n")},
			{Dir("layers", 0o755), File("layers/3.txt", 0o644, "layer 3: served by fuse-overlayfs\n")},
		},
		Cmd: []string{ProbePath, "show", "/layers/1.txt", "/layers/2.txt", "/layers/3.txt"},
	}
}
