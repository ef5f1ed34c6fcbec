package layer

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"runtime/debug"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/archive"
	"github.com/moby/sys/userns"
	"golang.org/x/sys/unix"
)

// The containment harness. Each run gets a sandbox directory laid out like a
// snapshotter root, with decoys beside the layers:
//
//	s/                     decoy entries (makeDecoy) at this level too
//	s/decoy/               the decoy tree
//	s/snapshots/N/{fs,work}
//	s/proc/                procfs, seen only by the applying thread
//	s/tmp/.../s -> /       the sandbox's own host path, leading back to s/
//
// Every Apply and Finish runs on a locked OS thread with its own mount
// namespace and its own root: chroot(s). Paths handed to the applier are the
// real host paths (they resolve through the s/tmp/.../s symlink inside the
// chroot), so the applier works as in production; but anything that escapes
// the layer through an absolute symlink target ("/", "/a") lands in the
// sandbox, where the snapshot sees it, instead of on the host. The thread
// dies with its goroutine, and its namespace with it.
//
// Around each operation the whole sandbox is recorded bit for bit (type,
// content hash, mode, owner, link count, rdev, symlink target, all xattrs,
// mtime, atime, ctime; and the set of names); only the layer being written
// (and its state file) may differ afterwards. Access times are frozen in the
// future before each operation so that merely reading a decoy or a lower
// layer (relatime) does not count, while setting a time does. A layer's
// operations may also change the times and link count of its snapshot
// directory (where the state file goes) and the state file itself.

// Access time given to every entry of the sandbox before an operation:
// relatime does not update an atime later than mtime and ctime and less
// than a day old.
var frozenAtime = unix.NsecToTimespec(time.Now().Add(time.Hour).Truncate(time.Second).UnixNano())

var decoyMtime = unix.NsecToTimespec(time.Date(2001, 2, 3, 4, 5, 6, 789, time.UTC).UnixNano())

type decoyEntry struct {
	name   string
	kind   string // dir file sym chr fifo
	mode   uint32
	uid    int
	gid    int
	body   string
	dev    int
	link   string
	xattrs map[string]string
}

// decoyEntries use the generator's alphabet, so that escapes hit existing
// decoys: directories marked opaque in both forms, 0/0 devices and empty
// .wh. files (shaped like whiteouts a base layer's Finish removes), a
// setuid file, files and directories of mode 0000, a device, a FIFO, a
// symlink.
var decoyEntries = []decoyEntry{
	{name: "a", kind: "dir", mode: 0o750, uid: 4242, gid: 4343, xattrs: map[string]string{
		"user.decoy": "a", "trusted.decoy": "a", OpaqueXattrUser: "y", OpaqueXattrTrusted: "y"}},
	{name: "a/a", kind: "dir", mode: 0o755, xattrs: map[string]string{OpaqueXattrTrusted: "y", OpaqueXattrUser: "y"}},
	{name: "a/b", kind: "chr", mode: 0o600},
	{name: "a/.wh.c", kind: "file", mode: 0o644},
	{name: "a/d", kind: "file", mode: 0o4755, body: "decoy a/d\n", xattrs: map[string]string{"user.x": "1", "trusted.x": "1"}},
	{name: "a/e", kind: "sym", link: "../b", uid: 5, gid: 5},
	{name: "b", kind: "chr", mode: 0o644},
	{name: ".wh.c", kind: "file", mode: 0o644},
	{name: "c", kind: "dir", mode: 0, uid: 1, gid: 1, xattrs: map[string]string{OpaqueXattrUser: "y"}},
	{name: "c/d", kind: "file", mode: 0, body: "decoy c/d\n"},
	{name: "c/.wh..wh..opq", kind: "file", mode: 0o644},
	{name: "d", kind: "file", mode: 0o600, uid: 1000, gid: 1000, body: "decoy d\n", xattrs: map[string]string{"user.d": "1", "trusted.d": "1"}},
	{name: "null", kind: "chr", mode: 0o666, dev: int(unix.Mkdev(1, 3))},
	{name: "fifo", kind: "fifo", mode: 0o640, uid: 7, gid: 8},
	{name: "suid", kind: "file", mode: 0o6755, body: "#!/bin/sh\n"},
	{name: "sym", kind: "sym", link: "a", uid: 5, gid: 5},
}

// makeDecoy puts the decoy entries into dir and marks dir itself.
func makeDecoy(dir string) error {
	for _, e := range decoyEntries {
		p := filepath.Join(dir, e.name)
		var err error
		switch e.kind {
		case "dir":
			err = os.Mkdir(p, 0o700)
		case "file":
			err = os.WriteFile(p, []byte(e.body), 0o600)
		case "sym":
			err = os.Symlink(e.link, p)
		case "chr":
			err = unix.Mknod(p, unix.S_IFCHR|e.mode, e.dev)
		case "fifo":
			err = unix.Mkfifo(p, e.mode)
		}
		if err != nil {
			return fmt.Errorf("decoy %s: %w", p, err)
		}
		if err := unix.Lchown(p, e.uid, e.gid); err != nil {
			return err
		}
		if e.kind != "sym" {
			if err := unix.Chmod(p, e.mode); err != nil {
				return err
			}
		}
		for k, v := range e.xattrs {
			if err := unix.Lsetxattr(p, k, []byte(v), 0); err != nil {
				return fmt.Errorf("decoy %s xattr %s: %w", p, k, err)
			}
		}
	}
	for _, k := range []string{"user.decoy", "trusted.decoy"} {
		if err := unix.Lsetxattr(dir, k, []byte("root"), 0); err != nil {
			return err
		}
	}
	// Times last, children first being irrelevant: utimes does not touch
	// the parent.
	for _, e := range append(decoyEntries, decoyEntry{name: "."}) {
		ts := []unix.Timespec{frozenAtime, decoyMtime}
		if err := unix.UtimesNanoAt(unix.AT_FDCWD, filepath.Join(dir, e.name), ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return err
		}
	}
	return nil
}

// fsEntry is everything recorded of one entry.
type fsEntry struct {
	typ, mode, uid, gid uint32
	nlink, rdev         uint64
	mtime, atime, ctime unix.Timespec
	hash, link, xattrs  string
}

type fsSnap map[string]fsEntry

// snapshotTree records every entry under root (root itself as "."),
// following no symlink and updating no access time.
func snapshotTree(root string) (fsSnap, error) {
	s := fsSnap{}
	var walk func(rel string) error
	walk = func(rel string) error {
		p := root
		if rel != "." {
			p = root + "/" + rel
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		e := fsEntry{
			typ: st.Mode & unix.S_IFMT, mode: st.Mode & 0o7777, uid: st.Uid, gid: st.Gid,
			nlink: st.Nlink, rdev: st.Rdev, mtime: st.Mtim, atime: st.Atim, ctime: st.Ctim,
		}
		switch e.typ {
		case unix.S_IFREG:
			h, err := hashFile(p)
			if err != nil {
				return err
			}
			e.hash = h
		case unix.S_IFLNK:
			l, err := os.Readlink(p)
			if err != nil {
				return err
			}
			e.link = l
		}
		names, err := listXattrs(p)
		if err != nil {
			return err
		}
		sort.Strings(names)
		var xb strings.Builder
		for _, n := range names {
			v, err := getXattr(p, n)
			if err != nil {
				return err
			}
			fmt.Fprintf(&xb, "%s=%q ", n, v)
		}
		e.xattrs = xb.String()
		s[rel] = e
		if e.typ != unix.S_IFDIR {
			return nil
		}
		children, err := readDirNames(p)
		if err != nil {
			return err
		}
		for _, c := range children {
			cr := c
			if rel != "." {
				cr = rel + "/" + c
			}
			if err := walk(cr); err != nil {
				return err
			}
		}
		return nil
	}
	return s, walk(".")
}

func openNoAtime(p string, flags int) (*os.File, error) {
	fd, err := unix.Open(p, flags|unix.O_NOATIME|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: p, Err: err}
	}
	return os.NewFile(uintptr(fd), p), nil
}

func hashFile(p string) (string, error) {
	f, err := openNoAtime(p, unix.O_RDONLY)
	if err != nil {
		return "", err
	}
	defer func() { _ = f.Close() }()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return fmt.Sprintf("%x", h.Sum(nil)[:12]), nil
}

func readDirNames(p string) ([]string, error) {
	f, err := openNoAtime(p, unix.O_RDONLY|unix.O_DIRECTORY)
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }()
	names, err := f.Readdirnames(-1)
	sort.Strings(names)
	return names, err
}

// freezeAtimes gives every entry under root the frozen access time.
func freezeAtimes(root string) error {
	return filepath.WalkDir(root, func(p string, _ os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		ts := []unix.Timespec{frozenAtime, {Nsec: unix.UTIME_OMIT}}
		return unix.UtimesNanoAt(unix.AT_FDCWD, p, ts, unix.AT_SYMLINK_NOFOLLOW)
	})
}

func fmtTime(ts unix.Timespec) string {
	return time.Unix(ts.Sec, ts.Nsec).UTC().Format("2006-01-02T15:04:05.000000000")
}

// diffEntry names what changed between two records of one entry; onlyMeta
// leaves out times and link counts.
func diffEntry(a, b fsEntry, onlyMeta bool) []string {
	var d []string
	add := func(what string, x, y any) { d = append(d, fmt.Sprintf("%s %v -> %v", what, x, y)) }
	if a.typ != b.typ {
		add("type", fmt.Sprintf("%o", a.typ), fmt.Sprintf("%o", b.typ))
	}
	if a.mode != b.mode {
		add("mode", fmt.Sprintf("%04o", a.mode), fmt.Sprintf("%04o", b.mode))
	}
	if a.uid != b.uid || a.gid != b.gid {
		add("owner", fmt.Sprintf("%d:%d", a.uid, a.gid), fmt.Sprintf("%d:%d", b.uid, b.gid))
	}
	if a.rdev != b.rdev {
		add("rdev", a.rdev, b.rdev)
	}
	if a.hash != b.hash {
		add("content", a.hash, b.hash)
	}
	if a.link != b.link {
		add("symlink target", fmt.Sprintf("%q", a.link), fmt.Sprintf("%q", b.link))
	}
	if a.xattrs != b.xattrs {
		add("xattrs", "["+a.xattrs+"]", "["+b.xattrs+"]")
	}
	if onlyMeta {
		return d
	}
	if a.nlink != b.nlink {
		add("nlink", a.nlink, b.nlink)
	}
	if a.mtime != b.mtime {
		add("mtime", fmtTime(a.mtime), fmtTime(b.mtime))
	}
	if a.atime != b.atime {
		add("atime", fmtTime(a.atime), fmtTime(b.atime))
	}
	if a.ctime != b.ctime {
		add("ctime", fmtTime(a.ctime), fmtTime(b.ctime))
	}
	return d
}

// compareSnaps lists what differs between two snapshots of a sandbox outside
// the area an operation on layer may change: snapshots/<layer>/fs and
// everything below it, state files ("unpack-state*") in snapshots/<layer>,
// and the times and link count of snapshots/<layer> itself (writing the
// state file changes them). layer < 0 allows nothing.
func compareSnaps(before, after fsSnap, layer int) []string {
	snapDir := fmt.Sprintf("snapshots/%d", layer+1)
	allowed := func(rel string) bool {
		if layer < 0 {
			return false
		}
		if rel == snapDir+"/fs" || strings.HasPrefix(rel, snapDir+"/fs/") {
			return true
		}
		dir, base := path2(rel)
		return dir == snapDir && strings.Contains(base, "unpack-state")
	}
	var d []string
	for rel, a := range before {
		if allowed(rel) {
			continue
		}
		b, ok := after[rel]
		if !ok {
			d = append(d, fmt.Sprintf("%s: removed", rel))
			continue
		}
		for _, x := range diffEntry(a, b, layer >= 0 && rel == snapDir) {
			d = append(d, fmt.Sprintf("%s: %s", rel, x))
		}
	}
	for rel, b := range after {
		if _, ok := before[rel]; !ok && !allowed(rel) {
			what := fmt.Sprintf("type %o mode %04o", b.typ, b.mode)
			if b.link != "" {
				what += fmt.Sprintf(" -> %q", b.link)
			}
			d = append(d, fmt.Sprintf("%s: appeared (%s)", rel, what))
		}
	}
	sort.Strings(d)
	return d
}

// errHang is returned by inChroot when fn did not return in time; the
// goroutine is left running in its chroot and the sandbox must be kept.
var errHang = errors.New("did not return in time")

// panicError is a panic of the code under test.
type panicError struct{ msg string }

func (p *panicError) Error() string { return "panic: " + p.msg }

// inChroot runs fn on a thread of its own whose root is root (see the
// harness comment): a setup failure is returned as setupErr, fn's error (or
// panic, as *panicError) as err.
func inChroot(root string, timeout time.Duration, fn func() error) (err, setupErr error) {
	type result struct{ err, setup error }
	done := make(chan result, 1)
	go func() {
		// Never unlocked: the thread's root and mount namespace are its
		// own, and it ends with this goroutine.
		runtime.LockOSThread()
		var r result
		defer func() { done <- r }()
		steps := []struct {
			what string
			do   func() error
		}{
			{"unshare", func() error { return unix.Unshare(unix.CLONE_FS | unix.CLONE_NEWNS) }},
			{"make mounts private", func() error { return unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, "") }},
			{"bind /proc", func() error { return unix.Mount("/proc", root+"/proc", "", unix.MS_BIND|unix.MS_REC, "") }},
			{"chroot", func() error { return unix.Chroot(root) }},
			{"chdir", func() error { return unix.Chdir("/") }},
		}
		for _, s := range steps {
			if err := s.do(); err != nil {
				r.setup = fmt.Errorf("%s: %w", s.what, err)
				return
			}
		}
		func() {
			defer func() {
				if p := recover(); p != nil {
					r.err = &panicError{fmt.Sprintf("%v\n%s", p, debug.Stack())}
				}
			}()
			r.err = fn()
		}()
	}()
	select {
	case r := <-done:
		return r.err, r.setup
	case <-time.After(timeout):
		return errHang, nil
	}
}

// prepareSandbox makes a fresh sandbox at dir (see the harness comment)
// with n layer directories, and returns the stack.
func prepareSandbox(dir string, n int) (*stack, error) {
	if err := os.RemoveAll(dir); err != nil {
		return nil, err
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		return nil, err
	}
	if err := makeDecoy(dir); err != nil {
		return nil, err
	}
	if err := os.Mkdir(filepath.Join(dir, "decoy"), 0o755); err != nil {
		return nil, err
	}
	if err := unix.Lchown(filepath.Join(dir, "decoy"), 4242, 4343); err != nil {
		return nil, err
	}
	if err := makeDecoy(filepath.Join(dir, "decoy")); err != nil {
		return nil, err
	}
	if err := os.Mkdir(filepath.Join(dir, "proc"), 0o555); err != nil {
		return nil, err
	}
	// The sandbox's host path, inside it, leading back to its root.
	comps := strings.Split(strings.TrimPrefix(dir, "/"), "/")
	mirror := filepath.Join(append([]string{dir}, comps[:len(comps)-1]...)...)
	if err := os.MkdirAll(mirror, 0o755); err != nil {
		return nil, err
	}
	if err := os.Symlink("/", filepath.Join(mirror, comps[len(comps)-1])); err != nil {
		return nil, err
	}
	s := &stack{root: dir}
	for i := 1; i <= n; i++ {
		sd := filepath.Join(dir, "snapshots", fmt.Sprint(i))
		if err := os.MkdirAll(filepath.Join(sd, "fs"), 0o755); err != nil {
			return nil, err
		}
		if err := os.Mkdir(filepath.Join(sd, "work"), 0o700); err != nil {
			return nil, err
		}
		s.dirs = append(s.dirs, filepath.Join(sd, "fs"))
	}
	return s, nil
}

// Modes of applying a sequence.
const (
	modeSequential   = iota // lowers known
	modeDetached            // every layer detached, then Finish with its lowers (the first: nil)
	modeDetachedBase        // the first layer detached and Finish(nil), the others sequential
)

var modeNames = []string{"sequential", "detached", "detached-base"}

type runSpec struct {
	mode int
	form string // "privileged" (probed) or "fallback"
}

func (s runSpec) String() string { return modeNames[s.mode] + "/" + s.form }

func allSpecs() []runSpec {
	var out []runSpec
	for m := range modeNames {
		for _, f := range []string{"privileged", "fallback"} {
			out = append(out, runSpec{m, f})
		}
	}
	return out
}

// outcome of one run.
type outcome struct {
	problems []string // containment breaches, panics, hangs: failures
	returned []string // errors Apply/Finish returned (allowed)
	ok       bool     // every operation returned nil
	view     map[string]string
	viewErr  error
}

// harness runs sequences in sandboxes under base.
type harness struct {
	tb      testing.TB
	base    string
	forms   map[string]Forms
	timeout time.Duration
	broken  bool // a hang left a goroutine in a sandbox
}

func newHarness(tb testing.TB) *harness {
	tb.Helper()
	base, err := filepath.EvalSymlinks(tb.TempDir())
	if err != nil {
		tb.Fatal(err)
	}
	// Warm what caches its answer: asked first inside a chroot without
	// /proc, it could answer wrong for the whole process.
	_ = userns.RunningInUserNS()
	probed := ProbeForms(base)
	return &harness{tb: tb, base: base, forms: map[string]Forms{"privileged": probed, "fallback": FallbackForms}, timeout: time.Minute}
}

func (h *harness) sandboxDir() string { return filepath.Join(h.base, "s") }

// placeholders: what @DECOY@ and @SANDBOX@ stand for, in our runs and in
// the native ones alike (so that symlink targets compare equal).
func (h *harness) placeholders(layers [][]ent) [][]ent {
	return substitute(layers, filepath.Join(h.sandboxDir(), "decoy"), h.sandboxDir())
}

// run applies layers (placeholders not yet substituted) in the given mode
// and checks containment around each operation; with view, it also returns
// the tree seen through a fuse-overlayfs mount when every operation
// succeeded.
func (h *harness) run(layers [][]ent, sp runSpec, view bool) outcome {
	h.tb.Helper()
	var out outcome
	if h.broken {
		h.tb.Fatal("harness unusable after a hang")
	}
	layers = h.placeholders(layers)
	tars := make([][]byte, len(layers))
	for i, l := range layers {
		b, err := tarBytesErr(l)
		if err != nil {
			h.tb.Fatalf("generated layer %d cannot be written as a tar: %v", i, err)
		}
		tars[i] = b
	}
	s, err := prepareSandbox(h.sandboxDir(), len(layers))
	if err != nil {
		h.tb.Fatal(err)
	}
	forms := h.forms[sp.form]
	ctx := context.Background()
	op := func(what string, i int, fn func() error) bool { return h.op(s, &out, what, i, fn) }
	apply := func(i int, detached bool) bool {
		opts := Options{Forms: &forms}
		what := fmt.Sprintf("Apply layer %d", i)
		if detached {
			opts.Detached, opts.StateFile = true, s.state(i)
			what += " detached"
		} else {
			opts.Lowers = s.lowers(i)
		}
		return op(what, i, func() error { return Apply(ctx, s.dirs[i], bytes.NewReader(tars[i]), opts) })
	}
	finish := func(i int, lowers []string) bool {
		return op(fmt.Sprintf("Finish layer %d with %d lowers", i, len(lowers)), i, func() error {
			return Finish(ctx, s.dirs[i], s.state(i), lowers)
		})
	}
	// A refused layer would end an unpack; the following operations run
	// anyway (containment must hold whatever the lowers hold), but the
	// view is compared only when every operation succeeded.
	out.ok = true
	note := func(ok bool) bool {
		out.ok = out.ok && ok
		return ok
	}
	switch sp.mode {
	case modeSequential:
		for i := range layers {
			if note(apply(i, false)); h.broken {
				return out
			}
		}
	case modeDetached:
		// As a parallel unpack: every layer applied, then committed
		// bottom-up (each one that applied).
		applied := make([]bool, len(layers))
		for i := range layers {
			applied[i] = note(apply(i, true))
			if h.broken {
				return out
			}
		}
		for i := range layers {
			if applied[i] {
				note(finish(i, s.lowers(i)))
			}
			if h.broken {
				return out
			}
		}
	case modeDetachedBase:
		if note(apply(0, true)) {
			note(finish(0, nil))
		}
		for i := 1; i < len(layers) && !h.broken; i++ {
			note(apply(i, false))
		}
	}
	if h.broken || !view || !out.ok || len(out.problems) > 0 {
		return out
	}
	mnt := filepath.Join(h.base, "mnt")
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		h.tb.Fatal(err)
	}
	unmount, err := mountStackAt(s, mnt)
	if err != nil {
		out.viewErr = err
		return out
	}
	out.view, out.viewErr = treeErr(mnt)
	if err := unmount(); err != nil {
		h.broken = true
		h.tb.Fatal(err)
	}
	return out
}

// op runs fn (an operation on layer i of s) in the sandbox's chroot and
// records in out what it returned and what changed outside layer i. It
// tells whether fn returned nil.
func (h *harness) op(s *stack, out *outcome, what string, i int, fn func() error) bool {
	h.tb.Helper()
	if err := freezeAtimes(s.root); err != nil {
		h.tb.Fatal(err)
	}
	before, err := snapshotTree(s.root)
	if err != nil {
		h.tb.Fatal(err)
	}
	ferr, setupErr := inChroot(s.root, h.timeout, fn)
	if setupErr != nil {
		h.tb.Fatalf("chroot for %s: %v", what, setupErr)
	}
	var pe *panicError
	switch {
	case errors.Is(ferr, errHang):
		h.broken = true
		out.problems = append(out.problems, fmt.Sprintf("%s: hang: %v (after %v)", what, ferr, h.timeout))
		return false
	case errors.As(ferr, &pe):
		out.problems = append(out.problems, fmt.Sprintf("%s: %v", what, ferr))
	case ferr != nil:
		out.returned = append(out.returned, fmt.Sprintf("%s: %v", what, ferr))
	}
	after, err := snapshotTree(s.root)
	if err != nil {
		h.tb.Fatal(err)
	}
	for _, d := range compareSnaps(before, after, i) {
		out.problems = append(out.problems, fmt.Sprintf("%s: outside the layer: %s", what, d))
	}
	return ferr == nil
}

// nativeResult is containerd's extraction of a sequence into one directory.
type nativeResult struct {
	tree    map[string]string
	usable  bool   // every layer applied, and nothing outside changed
	whyNot  string // when not usable
	escaped bool   // containerd's extraction changed its sandbox outside its directory
}

// native applies layers with containerd's archive.Apply into one directory,
// in a sandbox of its own (away from the decoy our runs check), in a chroot
// as ours, and notes whether it stayed in its directory.
func (h *harness) native(layers [][]ent) nativeResult {
	h.tb.Helper()
	layers = h.placeholders(layers)
	s, err := prepareSandbox(filepath.Join(h.base, "n"), 1)
	if err != nil {
		h.tb.Fatal(err)
	}
	dir := s.dirs[0]
	for i, l := range layers {
		data, err := tarBytesErr(l)
		if err != nil {
			h.tb.Fatal(err)
		}
		if err := freezeAtimes(s.root); err != nil {
			h.tb.Fatal(err)
		}
		before, err := snapshotTree(s.root)
		if err != nil {
			h.tb.Fatal(err)
		}
		aerr, setupErr := inChroot(s.root, h.timeout, func() error {
			_, err := archive.Apply(context.Background(), dir, bytes.NewReader(data))
			return err
		})
		if setupErr != nil {
			h.tb.Fatal(setupErr)
		}
		if errors.Is(aerr, errHang) {
			h.broken = true
			h.tb.Fatalf("containerd's extraction hung on layer %d", i)
		}
		after, err := snapshotTree(s.root)
		if err != nil {
			h.tb.Fatal(err)
		}
		if d := compareSnaps(before, after, 0); len(d) > 0 {
			return nativeResult{escaped: true, whyNot: fmt.Sprintf("containerd's extraction of layer %d left its directory: %s", i, strings.Join(d, "; "))}
		}
		if aerr != nil {
			return nativeResult{whyNot: fmt.Sprintf("containerd's extraction of layer %d: %v", i, aerr)}
		}
	}
	if q := containerdQuirks(layers); len(q) > 0 {
		return nativeResult{whyNot: "containerd quirk: " + strings.Join(q, "; ")}
	}
	t, err := treeErr(dir)
	if err != nil {
		h.tb.Fatal(err)
	}
	return nativeResult{tree: t, usable: true}
}

// Xattrs left out of view comparisons: overlay markers. containerd's
// extraction writes user.* ones from the tar as they come while ours must
// drop them (TestHostileXattrsDropped checks that on the layer itself), and
// fuse-overlayfs hides or interprets them; trusted.* are dropped by both.
var markerXattr = regexp.MustCompile(` xattr:(trusted\.overlay\.|user\.fuseoverlayfs\.|user\.overlay\.)[^ =]*="(?:[^"\\]|\\.)*"`)

// comparableView prepares a tree for comparison with the other side.
// Legitimate differences left out:
//   - overlay marker xattrs (markerXattr);
//   - in containerd's tree, 0/0 character devices: a real one cannot exist
//     in an overlay layer (it is a whiteout there), so a layer that has one
//     shows nothing at that name through the mount.
func comparableView(t map[string]string, nativeSide bool) map[string]string {
	out := make(map[string]string, len(t))
	for k, v := range t {
		if nativeSide && strings.HasPrefix(v, fmt.Sprintf("type=%o ", unix.S_IFCHR)) && strings.HasSuffix(strings.SplitN(v, " xattr:", 2)[0], " dev=0:0") {
			continue
		}
		out[k] = markerXattr.ReplaceAllString(v, "")
	}
	return out
}
