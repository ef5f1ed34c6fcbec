package integration

// End-to-end test of hostile layers: images whose names, link targets and
// xattrs try to leave the layer directory (towards a directory the test
// plants on the host) or to fake fuse-overlayfs' overlay markers. Each is
// pulled through the transfer service into fuse-overlayfs (our differ) and
// into native, sequentially and in parallel.

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/fosnap/fuseoverlayfs/integration/internal/harness"
	"github.com/fosnap/fuseoverlayfs/integration/internal/images"
)

// TestHostileImages pulls each hostile image (images.HostileImages) with
// max_concurrent_unpacks 1 and 4. A pull into fuse-overlayfs must either
// give the tree the native snapshotter gives (seen from containers on
// both), or fail with an error naming one of the hostile entries. The
// directory planted on the host, outside the containerd root, whose path
// the images carry, must stay unchanged bit for bit (type, content, mode,
// owner, times, xattrs, inode, link count, names) through every pull,
// container run and image removal, and no mount or process may be left
// after each step.
func TestHostileImages(t *testing.T) {
	requirePrereqs(t)
	f := getFixture(t)
	host := plantHost(t)
	hostile := images.HostileImages(f.probe, host.dir)
	refs := map[string]string{}
	for _, h := range hostile {
		ref, err := images.Push(f.registry.Addr, h.Spec)
		if err != nil {
			t.Fatalf("push %s: %v", h.Repo, err)
		}
		refs[h.Repo] = ref
	}
	host.check(t, "after building and pushing the images")

	for _, tc := range []struct {
		name    string
		unpacks int
	}{{"sequential", 1}, {"parallel", 4}} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, withUnpacks(tc.unpacks))
			for i, h := range hostile {
				t.Run(strings.TrimPrefix(h.Repo, "test/hostile-"), func(t *testing.T) {
					t.Logf("%s: %s", h.Repo, h.Doc)
					e.pullHostile(t, host, h, refs[h.Repo], fmt.Sprintf("hostile%d", i))
				})
			}
			// The parallel mode is only tested if the layers really were
			// applied before their parents were known.
			e.checkDirectLog(e.c.LogPath, e.builtinRoot(), tc.unpacks > 1, 0)
		})
	}
}

// pullHostile pulls one hostile image into fuse-overlayfs and native and
// judges the outcome.
func (e *env) pullHostile(t *testing.T, host *plantedHost, h images.Hostile, ref, id string) {
	pull := func(snapshotter string) error {
		_, err := e.c.Ctr(e.ctx, "images", "pull", "--plain-http", "--snapshotter", snapshotter, "--platform", "linux/"+goarch(), ref)
		return err
	}
	// fuse-overlayfs first: the pull fetches the layers, so that with
	// max_concurrent_unpacks > 1 they are unpacked in parallel.
	errFO := pull(sn)
	host.check(t, "after the fuse-overlayfs pull")
	e.checkQuiet(t, "after the fuse-overlayfs pull")
	errNative := pull("native")
	host.check(t, "after the native pull")
	e.checkQuiet(t, "after the native pull")

	switch {
	case errNative != nil && !h.NativeRefuses:
		t.Errorf("the native snapshotter refused %s (the test expects it to accept the image): %v", ref, errNative)
	case errNative == nil && h.NativeRefuses:
		t.Errorf("the native snapshotter accepted %s (the test expects it to refuse the image)", ref)
	}
	switch {
	case errFO != nil:
		e.checkClearError(t, h, errFO)
		if errNative == nil {
			t.Logf("native accepts the image that fuse-overlayfs refused (allowed, with a clear error)")
		}
	case errNative != nil:
		t.Errorf("fuse-overlayfs accepted %s, which the native snapshotter refuses with:\n%v", ref, errNative)
		if tree, err := e.treeOf(sn, ref, id); err == nil {
			t.Logf("tree on fuse-overlayfs:\n%s", strings.Join(tree, "\n"))
		}
		host.check(t, "after running a container on the image")
	default:
		e.compareHostileTrees(t, h, ref, id)
		host.check(t, "after running containers on the image")
	}
	e.checkQuiet(t, "after the containers")

	// A failed pull may have stored no image: the removal may fail then.
	if _, err := e.c.Ctr(e.ctx, "images", "rm", "--sync", ref); err != nil && errFO == nil && errNative == nil {
		t.Errorf("remove %s: %v", ref, err)
	}
	host.check(t, "after removing the image")
	e.checkQuiet(t, "after removing the image")
}

// checkClearError asserts that a refused pull names one of the hostile
// entries.
func (e *env) checkClearError(t *testing.T, h images.Hostile, err error) {
	t.Helper()
	msg := err.Error()
	if strings.Contains(msg, "timed out after") {
		t.Errorf("fuse-overlayfs pull timed out instead of refusing the image: %v", err)
		return
	}
	for _, n := range h.Names {
		if strings.Contains(msg, n) {
			t.Logf("fuse-overlayfs refused the image, naming %q:\n%s", n, linesContaining(msg, n))
			return
		}
	}
	t.Errorf("fuse-overlayfs refused %s with an error that names none of the hostile entries %q:\n%v", h.Repo, h.Names, err)
}

// compareHostileTrees compares the whole tree containers see on both
// snapshotters, and the image's own expectations on each.
func (e *env) compareHostileTrees(t *testing.T, h images.Hostile, ref, id string) {
	t.Helper()
	trees := map[string][]string{}
	for _, s := range []string{"native", sn} {
		tree, err := e.treeOf(s, ref, id)
		if err != nil {
			t.Errorf("dump the tree of %s on %s: %v", ref, s, err)
			return
		}
		trees[s] = tree
	}
	native, fo := stripOverlayXattrs(trees["native"]), stripOverlayXattrs(trees[sn])
	if strings.Join(native, "\n") != strings.Join(trees["native"], "\n") {
		t.Logf("native shows overlay xattrs, which fuse-overlayfs cannot show; compared without them:\n%s", diffLines(trees["native"], native))
	}
	if diff := diffLines(native, fo); diff != "" {
		t.Errorf("%s: the tree on fuse-overlayfs differs from native (- native, + fuse-overlayfs):\n%s", ref, diff)
	}
	for _, s := range []string{"native", sn} {
		paths := map[string]bool{}
		for _, l := range trees[s] {
			paths[treePath(l)] = true
		}
		for _, p := range h.Present {
			if !paths[p] {
				t.Errorf("%s: %s is missing from the tree on %s", ref, p, s)
			}
		}
		for _, p := range h.Absent {
			if paths[p] {
				t.Errorf("%s: %s is in the tree on %s, the layers delete or never write it", ref, p, s)
			}
		}
	}
}

// treeOf runs a container on the image and returns its treedump of "/".
func (e *env) treeOf(snapshotter, ref, id string) ([]string, error) {
	name := id + "-" + snapshotter
	out, err := e.c.Ctr(e.ctx, "run", "--rm", "--snapshotter", snapshotter, ref, name, images.ProbePath, "treedump", "/")
	if err != nil {
		// A failed `ctr run --rm` may leave its container behind.
		_, _ = e.c.Ctr(e.ctx, "containers", "rm", name)
		return nil, err
	}
	tree := treeLines(out)
	if len(tree) < 3 {
		return nil, fmt.Errorf("nearly empty tree:\n%s", out)
	}
	return tree, nil
}

// treePath is the path (unquoted) of a treedump line.
func treePath(line string) string {
	f := strings.Fields(line)
	if len(f) == 0 {
		return ""
	}
	return strings.Trim(f[0], `"`)
}

// overlayXattrPrefixes are xattr names that fuse-overlayfs keeps for itself
// (and hides from listings) or that only mean something to overlayfs: a
// fuse-overlayfs mount cannot show them, so the comparison leaves them out.
// Their effect (opacity) is still compared.
var overlayXattrPrefixes = []string{"trusted.overlay.", "user.overlay.", "user.fuseoverlayfs."}

// stripOverlayXattrs removes the overlay xattrs from the last field
// (name=hex,...) of each treedump line.
func stripOverlayXattrs(lines []string) []string {
	out := make([]string, 0, len(lines))
	for _, l := range lines {
		i := strings.LastIndexByte(l, ' ')
		if i < 0 {
			out = append(out, l)
			continue
		}
		var keep []string
		if l[i+1:] != "-" {
		next:
			for _, x := range strings.Split(l[i+1:], ",") {
				for _, p := range overlayXattrPrefixes {
					if strings.HasPrefix(x, p) {
						continue next
					}
				}
				keep = append(keep, x)
			}
		}
		field := "-"
		if len(keep) > 0 {
			field = strings.Join(keep, ",")
		}
		out = append(out, l[:i+1]+field)
	}
	return out
}

// checkQuiet waits until no mount below the test's containerd directory
// and no process naming it (other than containerd itself) is left: no
// fuse-overlayfs server, bind mount or shim outlives a pull or a container.
func (e *env) checkQuiet(t *testing.T, when string) {
	t.Helper()
	var left harness.Leftovers
	err := harness.Poll(15*time.Second, 100*time.Millisecond, func() error {
		l, err := harness.FindLeftovers(e.dir)
		if err != nil {
			return err
		}
		var procs []harness.Proc
		for _, p := range l.Procs {
			if p.PID != e.c.PID() {
				procs = append(procs, p)
			}
		}
		l.Procs = procs
		left = l
		if !l.Empty() {
			return errors.New("mounts or processes left")
		}
		return nil
	})
	if err != nil {
		t.Errorf("%s: %v:\n%s", when, err, left)
	}
}

// linesContaining returns the lines of s that contain sub.
func linesContaining(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, "    "+strings.TrimSpace(l))
		}
	}
	return strings.Join(out, "\n")
}

// plantedHost is a directory on the host, outside every containerd root,
// that the hostile images point at.
type plantedHost struct {
	root   string // holds dir and nothing else
	dir    string // the planted directory the images name
	before map[string][]string
}

// plantHost plants the host directory and records it. It is removed when
// the test ends.
func plantHost(t *testing.T) *plantedHost {
	t.Helper()
	root, err := os.MkdirTemp("", "fo-planted-")
	if err != nil {
		t.Fatal(err)
	}
	h := &plantedHost{root: root, dir: filepath.Join(root, "host")}
	t.Cleanup(func() {
		if err := os.RemoveAll(root); err != nil {
			t.Errorf("remove the planted directory: %v", err)
		}
	})
	if err := h.plant(); err != nil {
		t.Fatalf("plant %s: %v", h.dir, err)
	}
	if h.before, err = recordHost(root); err != nil {
		t.Fatalf("record %s: %v", root, err)
	}
	return h
}

// plant fills root with the planted directory: files, subdirectories (the
// names the images' attacks use), a symlink, a FIFO, with their own modes,
// owners, xattrs and times.
func (h *plantedHost) plant() error {
	type item struct {
		rel      string
		kind     string // dir, file, symlink, fifo
		mode     uint32
		uid, gid int
		body     string // file content or symlink target
		xattrs   map[string]string
	}
	items := []item{
		{"host", "dir", 0o755, 4242, 4343, "", map[string]string{"user.planted": "host", "trusted.planted": "host"}},
		{"host/f", "file", 0o640, 1001, 1002, "host f\n", map[string]string{"user.planted": "f"}},
		{"host/victim", "file", 0o600, 0, 0, "host victim\n", nil},
		{"host/suid", "file", 0o4755, 0, 0, "host suid\n", nil},
		{"host/sub", "dir", 0o750, 2001, 2002, "", map[string]string{"user.planted": "sub"}},
		{"host/sub/inner", "file", 0o644, 2003, 2004, "host sub/inner\n", nil},
		{"host/b", "dir", 0o711, 3001, 3002, "", nil},
		{"host/b/c", "dir", 0o700, 3003, 3004, "", map[string]string{"trusted.planted": "b/c"}},
		{"host/b/c/file", "file", 0o444, 3005, 3006, "host b/c/file\n", nil},
		{"host/x", "dir", 0o755, 0, 0, "", nil},
		{"host/y", "dir", 0o1777, 0, 0, "", nil},
		{"host/lnk", "symlink", 0, 5001, 5002, "f", nil},
		{"host/fifo", "fifo", 0o620, 6001, 6002, "", nil},
	}
	if err := os.Chmod(h.root, 0o755); err != nil {
		return err
	}
	for _, it := range items {
		p := filepath.Join(h.root, it.rel)
		var err error
		switch it.kind {
		case "dir":
			err = os.Mkdir(p, 0o700)
		case "file":
			err = os.WriteFile(p, []byte(it.body), 0o600)
		case "symlink":
			err = os.Symlink(it.body, p)
		case "fifo":
			err = unix.Mkfifo(p, 0o600)
		}
		if err != nil {
			return err
		}
		if err := os.Lchown(p, it.uid, it.gid); err != nil {
			return err
		}
		if it.kind != "symlink" {
			// After chown, which clears setuid.
			if err := unix.Chmod(p, it.mode); err != nil {
				return fmt.Errorf("chmod %s: %w", p, err)
			}
		}
		for k, v := range it.xattrs {
			if err := unix.Lsetxattr(p, k, []byte(v), 0); err != nil {
				return fmt.Errorf("setxattr %s %s: %w", p, k, err)
			}
		}
	}
	// Times last, deepest first, each its own, all in the past.
	base := time.Date(2001, 2, 3, 4, 5, 6, 0, time.UTC)
	for i := len(items) - 1; i >= -1; i-- {
		p := h.root
		if i >= 0 {
			p = filepath.Join(h.root, items[i].rel)
		}
		at := base.Add(time.Duration(i+2)*time.Hour + 123456789)
		mt := base.Add(time.Duration(i+2)*24*time.Hour + 987654321)
		ts := []unix.Timespec{unix.NsecToTimespec(at.UnixNano()), unix.NsecToTimespec(mt.UnixNano())}
		if err := unix.UtimesNanoAt(unix.AT_FDCWD, p, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fmt.Errorf("utimes %s: %w", p, err)
		}
	}
	return nil
}

// check fails the test if anything below the planted root differs from the
// record, or if anything is mounted there. After a change it plants the
// directory afresh, so that each step is judged on its own.
func (h *plantedHost) check(t *testing.T, when string) {
	t.Helper()
	mounts, err := harness.Mounts()
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range mounts {
		if m.Point == h.root || strings.HasPrefix(m.Point, h.root+"/") {
			t.Errorf("%s: %s is mounted inside the planted host directory (type %s, source %s)", when, m.Point, m.FSType, m.Source)
			if err := unix.Unmount(m.Point, unix.MNT_DETACH); err != nil {
				t.Errorf("umount %s: %v", m.Point, err)
			}
		}
	}
	after, err := recordHost(h.root)
	if err != nil {
		t.Errorf("%s: reading the planted host directory: %v", when, err)
	} else if diff := diffHost(h.before, after); diff != "" {
		t.Errorf("%s: THE PLANTED HOST DIRECTORY %s CHANGED (outside every containerd root):\n%s", when, h.dir, diff)
	} else {
		return
	}
	if err := os.RemoveAll(h.root); err != nil {
		t.Fatalf("re-plant: %v", err)
	}
	if err := os.Mkdir(h.root, 0o700); err != nil {
		t.Fatalf("re-plant: %v", err)
	}
	if err := h.plant(); err != nil {
		t.Fatalf("re-plant: %v", err)
	}
	if h.before, err = recordHost(h.root); err != nil {
		t.Fatalf("re-plant: %v", err)
	}
}

// recordHost describes every entry below root (root included, as ".") by
// "key=value" fields. Nothing is followed and nothing is read in a way that
// changes an access time (O_NOATIME), except for symlinks: readlink sets
// their atime, which is therefore left out.
func recordHost(root string) (map[string][]string, error) {
	rec := map[string][]string{}
	var walk func(rel string) error
	walk = func(rel string) error {
		p := filepath.Join(root, rel)
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return &os.PathError{Op: "lstat", Path: p, Err: err}
		}
		atime := "atime=" + tsString(st.Atim)
		if st.Mode&unix.S_IFMT == unix.S_IFLNK {
			// Reading a symlink (ours below included) sets its atime.
			atime = "atime=(not compared for symlinks)"
		}
		fields := []string{
			"type=" + fileType(st.Mode),
			fmt.Sprintf("mode=%o", st.Mode),
			fmt.Sprintf("owner=%d:%d", st.Uid, st.Gid),
			fmt.Sprintf("size=%d", st.Size),
			fmt.Sprintf("nlink=%d", st.Nlink),
			fmt.Sprintf("ino=%d", st.Ino),
			atime,
			"mtime=" + tsString(st.Mtim),
			"ctime=" + tsString(st.Ctim),
		}
		xattrs, err := hostXattrs(p)
		if err != nil {
			return err
		}
		fields = append(fields, "xattrs="+xattrs)
		var names []string
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFREG:
			sum, err := hashNoAtime(p)
			if err != nil {
				return err
			}
			fields = append(fields, "sha256="+sum)
		case unix.S_IFLNK:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			fields = append(fields, fmt.Sprintf("target=%q", target))
		case unix.S_IFDIR:
			if names, err = readDirNoAtime(p); err != nil {
				return err
			}
			fields = append(fields, fmt.Sprintf("names=%q", names))
		}
		rec[rel] = fields
		for _, n := range names {
			if err := walk(filepath.Join(rel, n)); err != nil {
				return err
			}
		}
		return nil
	}
	return rec, walk(".")
}

func fileType(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFREG:
		return "file"
	case unix.S_IFDIR:
		return "dir"
	case unix.S_IFLNK:
		return "symlink"
	case unix.S_IFIFO:
		return "fifo"
	case unix.S_IFCHR:
		return "char"
	case unix.S_IFBLK:
		return "block"
	case unix.S_IFSOCK:
		return "socket"
	}
	return "unknown"
}

func tsString(ts unix.Timespec) string {
	return time.Unix(ts.Sec, ts.Nsec).UTC().Format(time.RFC3339Nano)
}

func openNoAtime(p string, flags int) (*os.File, error) {
	fd, err := unix.Open(p, flags|unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NOATIME|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: p, Err: err}
	}
	return os.NewFile(uintptr(fd), p), nil
}

func hashNoAtime(p string) (string, error) {
	f, err := openNoAtime(p, 0)
	if err != nil {
		return "", err
	}
	defer func() { _ = f.Close() }()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func readDirNoAtime(p string) ([]string, error) {
	f, err := openNoAtime(p, unix.O_DIRECTORY)
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }()
	names, err := f.Readdirnames(-1)
	if err != nil {
		return nil, err
	}
	sort.Strings(names)
	return names, nil
}

// hostXattrs lists every xattr of p (trusted.* included: the test runs as
// root) as sorted name=hex pairs.
func hostXattrs(p string) (string, error) {
	size, err := unix.Llistxattr(p, nil)
	if err != nil {
		return "", &os.PathError{Op: "llistxattr", Path: p, Err: err}
	}
	buf := make([]byte, size)
	if size > 0 {
		if size, err = unix.Llistxattr(p, buf); err != nil {
			return "", &os.PathError{Op: "llistxattr", Path: p, Err: err}
		}
	}
	var pairs []string
	for _, name := range strings.Split(string(buf[:size]), "\x00") {
		if name == "" {
			continue
		}
		vsize, err := unix.Lgetxattr(p, name, nil)
		if err != nil {
			return "", &os.PathError{Op: "lgetxattr " + name, Path: p, Err: err}
		}
		val := make([]byte, vsize)
		if vsize > 0 {
			if vsize, err = unix.Lgetxattr(p, name, val); err != nil {
				return "", &os.PathError{Op: "lgetxattr " + name, Path: p, Err: err}
			}
		}
		pairs = append(pairs, name+"="+hex.EncodeToString(val[:vsize]))
	}
	sort.Strings(pairs)
	if len(pairs) == 0 {
		return "-", nil
	}
	return strings.Join(pairs, ","), nil
}

// diffHost lists the entries added, removed and changed (with the fields
// that changed) between two records.
func diffHost(before, after map[string][]string) string {
	var paths []string
	for p := range before {
		paths = append(paths, p)
	}
	for p := range after {
		if _, ok := before[p]; !ok {
			paths = append(paths, p)
		}
	}
	sort.Strings(paths)
	var b strings.Builder
	for _, p := range paths {
		bf, inBefore := before[p]
		af, inAfter := after[p]
		switch {
		case !inAfter:
			fmt.Fprintf(&b, "  removed %s (was %s)\n", p, strings.Join(bf, " "))
		case !inBefore:
			fmt.Fprintf(&b, "  added   %s: %s\n", p, strings.Join(af, " "))
		default:
			var changes []string
			for i := range max(len(bf), len(af)) {
				var x, y string
				if i < len(bf) {
					x = bf[i]
				}
				if i < len(af) {
					y = af[i]
				}
				if x != y {
					changes = append(changes, x+" -> "+y)
				}
			}
			if len(changes) > 0 {
				fmt.Fprintf(&b, "  changed %s: %s\n", p, strings.Join(changes, "; "))
			}
		}
	}
	return b.String()
}
