package images

import (
	"archive/tar"
	"path"
	"strings"
)

// Hostile is an image whose layers attack the layer applier: names, link
// targets and xattrs that try to reach a directory of the host (hostDir,
// planted by the test outside the containerd root) or to make the
// snapshotter's overlay markers say something the layers do not.
type Hostile struct {
	Spec
	// Doc says what the layers try.
	Doc string
	// Names are the hostile entries. A pull that refuses the image must
	// name one of them in its error.
	Names []string
	// Present are paths (absolute, in the image) that the unpacked image
	// must hold when a pull succeeds; they keep a comparison with the
	// native snapshotter from passing with both trees wrong the same way.
	Present []string
	// Absent are paths the unpacked image must not hold.
	Absent []string
	// NativeRefuses is set when containerd's own extraction (the native
	// snapshotter) cannot apply the image either.
	NativeRefuses bool
}

// RelativeEscape is the number of "../" that a relative hostile symlink
// puts before the host path: more than any layer directory is deep, so
// that the kernel, resolving from the layer directory, reaches "/".
const RelativeEscape = 24

// HostileImages returns the hostile images for the host directory hostDir
// (an absolute path). Each image's base layer holds the probe and, where
// the attack needs a target that exists inside the image, a decoy: the
// same path as hostDir inside the image, with files of the same names as
// the host's. Resolved inside the layer (as containerd's extraction does),
// the hostile names reach the decoy; resolved by the kernel from the layer
// directory, they reach the host. The attacks aim at names the test plants
// in hostDir: f, victim, sub/inner, b/c/file.
func HostileImages(probe []byte, hostDir string) []Hostile {
	h := strings.Trim(path.Clean(hostDir), "/")
	t := hostileHost{probe: probe, h: h, abs: "/" + h, rel: strings.Repeat("../", RelativeEscape) + h}
	return []Hostile{
		t.symlinkEscape(),
		t.dirThenSymlink(),
		t.dirThenSymlinkHostOnly(),
		t.linkThenSymlink(),
		t.linkThenSymlinkHostOnly(),
		t.impliedThenSymlink(),
		t.symlinkSwap(),
		t.overlayXattrs(),
	}
}

// hostileHost is what the hostile layers aim at: the host directory as a
// path in the image without slashes around it (h), absolute (abs) and
// climbing out of any layer directory with ../ (rel); probe goes into
// every base layer.
type hostileHost struct {
	probe       []byte
	h, abs, rel string
}

// in is name inside the host directory's path, relative to the image root.
func (t hostileHost) in(name string) string { return path.Join(t.h, name) }

// decoy is the host directory's twin inside the image.
func (t hostileHost) decoy() Layer {
	var l Layer
	comps := strings.Split(t.h, "/")
	for i := range comps {
		l = append(l, Dir(strings.Join(comps[:i+1], "/"), 0o755))
	}
	return append(l,
		File(t.in("f"), 0o644, "decoy f\n"),
		File(t.in("victim"), 0o644, "decoy victim\n"),
		Dir(t.in("sub"), 0o755),
		File(t.in("sub/inner"), 0o644, "decoy sub/inner\n"),
		Dir(t.in("b"), 0o755),
		Dir(t.in("b/c"), 0o755),
		File(t.in("b/c/file"), 0o644, "decoy b/c/file\n"),
	)
}

// symlinkEscape: symlinks to the host directory, absolute and relative,
// with files, hard links, whiteouts and opaque markers under them, in the
// same layer and in a later one.
func (t hostileHost) symlinkEscape() Hostile {
	return Hostile{
		Spec: Spec{Repo: "test/hostile-symlink-escape", Tag: "1", Layers: []Layer{
			append(base(t.probe), t.decoy()...),
			{
				Symlink("out-abs", t.abs),
				Symlink("out-rel", t.rel),
				File("out-abs/g", 0o644, "written through out-abs\n"),
				File("out-rel/g2", 0o600, "written through out-rel\n"),
				Hardlink("out-abs/hl", "out-abs/f"),
				Hardlink("out-rel/hl2", "out-rel/f"),
				Hardlink("hl-abs-target", t.abs+"/f"),
				Hardlink("hl-rel-target", t.rel+"/b/c/file"),
				Whiteout("out-abs/victim"),
				Entry{Path: "out-abs/sub", Type: tar.TypeDir, Mode: 0o700, UID: 11, GID: 12},
				File("out-abs/sub/new", 0o644, "new in sub\n"),
				Opaque("out-rel/sub"),
				// Names and link names that climb out or start at "/".
				File(strings.Repeat("../", 8)+t.h+"/dotdot-name", 0o644, "named with ../\n"),
				File(t.abs+"/abs-name", 0o644, "named with a leading /\n"),
				Hardlink("dotdot-link", strings.Repeat("../", 8)+t.h+"/f"),
			},
			{
				File("out-abs/later", 0o644, "later layer through out-abs\n"),
				Hardlink("out-rel/hl3", "out-abs/g2"),
				Whiteout("out-rel/g"),
				Opaque("out-abs/b"),
				Entry{Path: "out-rel/b/c", Type: tar.TypeDir, Mode: 0o701, UID: 13, GID: 14},
				File("out-rel/b/c/again", 0o644, "again\n"),
				Entry{Path: "out-abs/x", Type: tar.TypeDir, Mode: 0o750, Xattrs: map[string]string{"user.hostile": "x"}},
			},
		}, Cmd: []string{ProbePath, "echo", "hostile"}},
		Doc:   "symlinks to the host directory (absolute and ../ relative) with files, hard links, whiteouts and opaque markers below them, in the same and a later layer; names and link names with ../ and a leading /",
		Names: []string{"out-abs", "out-rel", "hl-abs-target", "hl-rel-target", "dotdot-name", "abs-name", "dotdot-link"},
		Present: []string{
			"/out-abs", "/out-rel", "/hl-abs-target", "/hl-rel-target", "/dotdot-link", t.abs + "/dotdot-name", t.abs + "/abs-name",
			t.abs + "/f", t.abs + "/g2", t.abs + "/hl", t.abs + "/hl2", t.abs + "/sub/new",
			t.abs + "/later", t.abs + "/hl3", t.abs + "/b/c/again", t.abs + "/x",
		},
		Absent: []string{t.abs + "/victim", t.abs + "/sub/inner", t.abs + "/g", t.abs + "/b/c/file"},
	}
}

// dirThenSymlink: a directory replaced, in the same layer, by a symlink to
// the host directory after entries under it were written; then more
// entries under it. Resolved by the kernel, the later entries (and the
// times of the directories written before) land on the host.
func (t hostileHost) dirThenSymlink() Hostile {
	return Hostile{
		Spec: Spec{Repo: "test/hostile-dir-then-symlink", Tag: "1", Layers: []Layer{
			append(base(t.probe), t.decoy()...),
			{
				Dir("pdir", 0o755),
				Dir("pdir/sub", 0o755),
				File("pdir/f", 0o644, "layer pdir/f\n"),
				File("pdir/sub/s", 0o644, "layer pdir/sub/s\n"),
				Hardlink("pdir-link", "pdir/f"),
				Hardlink("pdir/q2", "pdir/f"),
				Dir("prel", 0o755),
				Dir("prel/b", 0o755),
				Dir("prel/b/c", 0o755),
				Symlink("pdir", t.abs),
				Symlink("prel", t.rel),
				File("pdir/g", 0o644, "through pdir\n"),
				Hardlink("pdir/h", "pdir/f"),
				Hardlink("pdir/h2", "pdir-link"),
				Entry{Path: "pdir/sub", Type: tar.TypeDir, Mode: 0o700, UID: 21, GID: 22},
				Whiteout("pdir/sub/inner"),
				Opaque("prel/b"),
				File("prel/b/c/file", 0o600, "through prel\n"),
			},
		}, Cmd: []string{ProbePath, "echo", "hostile"}},
		Doc:     "directories replaced by symlinks to the host directory after entries below them were written, in the same layer; then files, hard links, whiteouts and opaque markers through them",
		Names:   []string{"pdir", "prel", "pdir-link"},
		Present: []string{"/pdir-link", t.abs + "/g", t.abs + "/h", t.abs + "/h2", t.abs + "/sub", t.abs + "/b/c/file"},
		Absent:  []string{"/pdir/q2", t.abs + "/sub/inner", t.abs + "/sub/s", t.abs + "/q2"},
	}
}

// dirThenSymlinkHostOnly: as dirThenSymlink, without the decoy: the hard
// link's target exists only on the host. containerd's extraction refuses
// the layer.
func (t hostileHost) dirThenSymlinkHostOnly() Hostile {
	return Hostile{
		Spec: Spec{Repo: "test/hostile-dir-then-symlink-hostonly", Tag: "1", Layers: []Layer{
			base(t.probe),
			{
				Dir("pdir", 0o755),
				Dir("pdir/sub", 0o755),
				File("pdir/f", 0o644, "layer pdir/f\n"),
				Hardlink("pdir-link", "pdir/f"),
				Symlink("pdir", t.abs),
				File("pdir/g", 0o644, "through pdir\n"),
				Hardlink("pdir/h", "pdir/victim"),
				Entry{Path: "pdir/sub", Type: tar.TypeDir, Mode: 0o700, UID: 21, GID: 22},
			},
		}, Cmd: []string{ProbePath, "echo", "hostile"}},
		Doc:           "as dir-then-symlink, but a hard link through the symlink names a file only the host directory has",
		Names:         []string{"pdir/h", "pdir/victim"},
		NativeRefuses: true,
	}
}

// linkThenSymlink: a layer hard-links files of a lower layer through a
// directory that it later turns into a symlink to the host directory
// (whose twin in the image has a file of the same name).
func (t hostileHost) linkThenSymlink() Hostile {
	return Hostile{
		Spec: Spec{Repo: "test/hostile-link-then-symlink", Tag: "1", Layers: []Layer{
			append(base(t.probe), t.decoy()...),
			{
				Dir("linkdir", 0o755),
				File("linkdir/f", 0o644, "lower linkdir/f\n"),
				Dir("linkdir/sub", 0o750),
				File("linkdir/sub/inner", 0o640, "lower linkdir/sub/inner\n"),
			},
			{
				Hardlink("link-before", "linkdir/f"),
				Hardlink("link-before2", "linkdir/sub/inner"),
				Symlink("linkdir", t.abs),
				Hardlink("link-after", "linkdir/f"),
				Hardlink("link-after2", "linkdir/sub/inner"),
			},
		}, Cmd: []string{ProbePath, "echo", "hostile"}},
		Doc:     "hard links to a lower layer's files through a directory that the same layer then turns into a symlink to the host directory; more links through the symlink",
		Names:   []string{"link-before", "link-after", "linkdir/f", "linkdir/sub/inner"},
		Present: []string{"/link-before", "/link-before2", "/link-after", "/link-after2", "/linkdir"},
	}
}

// linkThenSymlinkHostOnly: as linkThenSymlink without decoy and without
// links after the symlink: only the host has linkdir/f once linkdir is a
// symlink.
func (t hostileHost) linkThenSymlinkHostOnly() Hostile {
	return Hostile{
		Spec: Spec{Repo: "test/hostile-link-then-symlink-hostonly", Tag: "1", Layers: []Layer{
			base(t.probe),
			{
				Dir("linkdir", 0o755),
				File("linkdir/f", 0o644, "lower linkdir/f\n"),
				Dir("linkdir/sub", 0o750),
				File("linkdir/sub/inner", 0o640, "lower linkdir/sub/inner\n"),
			},
			{
				Hardlink("link-before", "linkdir/f"),
				Hardlink("link-before2", "linkdir/sub/inner"),
				Symlink("linkdir", t.abs),
			},
		}, Cmd: []string{ProbePath, "echo", "hostile"}},
		Doc:     "hard links to a lower layer's files through a directory that the same layer then turns into a symlink to the host directory, which has files of the same names",
		Names:   []string{"link-before", "linkdir/f", "linkdir/sub/inner"},
		Present: []string{"/link-before", "/link-before2", "/linkdir"},
	}
}

// impliedThenSymlink: a deep implied directory under a lower real
// directory with its own mode and owner; the same layer then turns the top
// directory into a symlink to the host directory, which has the same
// subtree.
func (t hostileHost) impliedThenSymlink() Hostile {
	return Hostile{
		Spec: Spec{Repo: "test/hostile-implied-then-symlink", Tag: "1", Layers: []Layer{
			append(base(t.probe), t.decoy()...),
			{
				Dir("deepimp", 0o755),
				Entry{Path: "deepimp/b", Type: tar.TypeDir, Mode: 0o710, UID: 1234, GID: 5678, Xattrs: map[string]string{"user.lower": "deepimp/b"}},
				File("deepimp/b/keep", 0o644, "lower deepimp/b/keep\n"),
			},
			{
				File("deepimp/b/c/file", 0o644, "implied parents\n"),
				Symlink("deepimp", t.abs),
				File("deepimp/b/c/file2", 0o644, "through deepimp\n"),
				File("deepimp/b/new/deep/file3", 0o644, "implied through deepimp\n"),
			},
		}, Cmd: []string{ProbePath, "echo", "hostile"}},
		Doc:     "a file under directories the tar only implies (a lower layer has one of them with its own mode, owner and xattr); the layer then turns the top one into a symlink to the host directory and writes through it",
		Names:   []string{"deepimp", "deepimp/b/c/file"},
		Present: []string{"/deepimp", t.abs + "/b/c/file2", t.abs + "/b/new/deep/file3", t.abs + "/b/c/file"},
		Absent:  []string{t.abs + "/b/keep"},
	}
}

// symlinkSwap: a symlink replaced by another symlink, with entries under
// each.
func (t hostileHost) symlinkSwap() Hostile {
	return Hostile{
		Spec: Spec{Repo: "test/hostile-symlink-swap", Tag: "1", Layers: []Layer{
			append(base(t.probe), t.decoy()...),
			{
				Dir("sx", 0o755),
				Dir("sy", 0o755),
				Symlink("swap-in", "sx"),
				File("swap-in/f1", 0o644, "one\n"),
				Symlink("swap-in", "sy"),
				File("swap-in/f2", 0o644, "two\n"),
				Symlink("swap-host", t.abs+"/sub"),
				File("swap-host/f1", 0o644, "host one\n"),
				Symlink("swap-host", t.rel+"/b"),
				File("swap-host/f2", 0o644, "host two\n"),
				Symlink("swap-wh", "sx"),
				File("swap-wh/f3", 0o644, "three\n"),
				Whiteout("swap-wh"),
				Symlink("swap-wh", t.abs),
				File("swap-wh/f4", 0o644, "four\n"),
			},
		}, Cmd: []string{ProbePath, "echo", "hostile"}},
		Doc:     "a symlink replaced by another one (directly and after a whiteout) with entries written under each, in the image and towards the host directory",
		Names:   []string{"swap-in", "swap-host", "swap-wh"},
		Present: []string{"/sx/f1", "/sy/f2", t.abs + "/sub/f1", t.abs + "/b/f2", "/sx/f3", t.abs + "/f4"},
		Absent:  []string{"/sx/f2", "/sy/f1", t.abs + "/sub/f2", t.abs + "/b/f1", t.abs + "/f3", "/sx/f4"},
	}
}

// overlayXattrs: xattrs that fuse-overlayfs or overlayfs read as their own
// markers, set from the tar on directories that lower layers fill.
func (t hostileHost) overlayXattrs() Hostile {
	lowerFill := func(dir string) []Entry {
		return []Entry{Dir(dir, 0o755), File(dir+"/lower", 0o644, "lower file of "+dir+"\n")}
	}
	var xl0 Layer
	xl0 = append(xl0, base(t.probe)...)
	for _, d := range []string{"opq-trusted", "opq-user-overlay", "opq-user-fo", "opq-all"} {
		xl0 = append(xl0, lowerFill(d)...)
	}
	xl0 = append(xl0, File("origin-file", 0o644, "lower origin-file\n"))
	return Hostile{
		Spec: Spec{Repo: "test/hostile-overlay-xattrs", Tag: "1", Layers: []Layer{
			xl0,
			{
				Entry{Path: "opq-trusted", Type: tar.TypeDir, Mode: 0o755, Xattrs: map[string]string{"trusted.overlay.opaque": "y"}},
				File("opq-trusted/upper", 0o644, "upper\n"),
				Entry{Path: "opq-user-overlay", Type: tar.TypeDir, Mode: 0o755, Xattrs: map[string]string{"user.overlay.opaque": "y"}},
				File("opq-user-overlay/upper", 0o644, "upper\n"),
				Entry{Path: "opq-user-fo", Type: tar.TypeDir, Mode: 0o755, Xattrs: map[string]string{"user.fuseoverlayfs.opaque": "y"}},
				File("opq-user-fo/upper", 0o644, "upper\n"),
				Entry{Path: "opq-all", Type: tar.TypeDir, Mode: 0o755, Xattrs: map[string]string{
					"trusted.overlay.opaque": "y", "user.overlay.opaque": "y", "user.fuseoverlayfs.opaque": "y", "user.keep": "kept",
				}},
				Entry{Path: "opq-new", Type: tar.TypeDir, Mode: 0o755, Xattrs: map[string]string{"user.fuseoverlayfs.opaque": "y", "user.overlay.opaque": "y"}},
				File("opq-new/upper", 0o644, "upper\n"),
				Entry{Path: "origin-file", Type: tar.TypeReg, Mode: 0o644, Body: []byte("upper origin-file\n"), Xattrs: map[string]string{
					"user.fuseoverlayfs.origin": "../../../../etc/passwd", "trusted.overlay.origin": "x", "user.overlay.redirect": "/etc", "user.keep": "kept",
				}},
			},
		}, Cmd: []string{ProbePath, "echo", "hostile"}},
		Doc:   "tar xattrs trusted.overlay.opaque, user.overlay.opaque, user.fuseoverlayfs.opaque (and origin/redirect ones) on directories and files that lower layers fill",
		Names: []string{"opq-trusted", "opq-user-overlay", "opq-user-fo", "opq-all", "opq-new", "origin-file"},
		Present: []string{
			"/opq-trusted/lower", "/opq-trusted/upper", "/opq-user-overlay/lower", "/opq-user-overlay/upper",
			"/opq-user-fo/lower", "/opq-user-fo/upper", "/opq-all/lower", "/opq-new/upper", "/origin-file",
		},
	}
}
