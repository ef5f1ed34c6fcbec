package testutil

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// TreeField selects a part of an entry that Tree describes.
type TreeField uint

// The parts of an entry Tree can describe, in the order they are written.
const (
	// TreeType is the file type (S_IFMT bits), as "type=%o".
	TreeType TreeField = 1 << iota
	// TreePerm is the permission, setuid, setgid and sticky bits, as "perm=%o".
	TreePerm
	// TreeOwner is "owner=uid:gid".
	TreeOwner
	// TreeSize is st_size of every entry, directories and symlinks too.
	TreeSize
	// TreeContent is the sha256 of a regular file's content.
	TreeContent
	// TreeLink is a symlink's target.
	TreeLink
	// TreeMtimeSec is the mtime in whole seconds of regular files,
	// devices and FIFOs (not of directories, whose mtime any change in
	// them moves, nor of symlinks).
	TreeMtimeSec
	// TreeTimes is the atime and mtime, to the nanosecond, of every entry.
	TreeTimes
	// TreeDev is a device's major:minor.
	TreeDev
)

// TreeOpts says what Tree describes of each entry.
type TreeOpts struct {
	// Fields are the parts described.
	Fields TreeField
	// Xattr, if set, says which extended attributes of the entry at rel
	// (a path relative to the root, "." for the root) are described;
	// nil describes none.
	Xattr func(rel, name string) bool
	// SkipRoot leaves the root itself out of the result.
	SkipRoot bool
}

// Tree describes every entry under root, not following symlinks, as a map
// from its path relative to root ("." for root) to a line of the fields
// opt selects, so that two trees can be compared entry by entry with
// TreeDiff. Hard links are described as the files they are (link counts
// are not described).
func Tree(root string, opt TreeOpts) (map[string]string, error) {
	out := map[string]string{}
	err := filepath.WalkDir(root, func(p string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return err
		}
		if rel == "." && opt.SkipRoot {
			return nil
		}
		desc, err := describe(p, rel, opt)
		if err != nil {
			return fmt.Errorf("describe %s: %w", p, err)
		}
		out[rel] = desc
		return nil
	})
	return out, err
}

// describe gives the line Tree keeps for the entry at p.
func describe(p, rel string, opt TreeOpts) (string, error) {
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		return "", err
	}
	var parts []string
	add := func(f TreeField, format string, args ...any) {
		if opt.Fields&f != 0 {
			parts = append(parts, fmt.Sprintf(format, args...))
		}
	}
	typ := st.Mode & unix.S_IFMT
	add(TreeType, "type=%o", typ)
	add(TreePerm, "perm=%o", st.Mode&0o7777)
	add(TreeOwner, "owner=%d:%d", st.Uid, st.Gid)
	add(TreeSize, "size=%d", st.Size)
	if typ == unix.S_IFREG && opt.Fields&TreeContent != 0 {
		data, err := os.ReadFile(p)
		if err != nil {
			return "", err
		}
		add(TreeContent, "sha=%x", sha256.Sum256(data))
	}
	if typ == unix.S_IFLNK && opt.Fields&TreeLink != 0 {
		l, err := os.Readlink(p)
		if err != nil {
			return "", err
		}
		add(TreeLink, "link=%s", l)
	}
	switch typ {
	case unix.S_IFREG, unix.S_IFCHR, unix.S_IFBLK, unix.S_IFIFO:
		add(TreeMtimeSec, "mtime=%d", st.Mtim.Sec)
	}
	add(TreeTimes, "atime=%s mtime=%s", nanoTime(st.Atim), nanoTime(st.Mtim))
	if typ == unix.S_IFCHR || typ == unix.S_IFBLK {
		add(TreeDev, "dev=%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
	}
	xs, err := describeXattrs(p, rel, opt.Xattr)
	if err != nil {
		return "", err
	}
	return strings.Join(append(parts, xs...), " "), nil
}

// nanoTime formats ts in UTC to the nanosecond.
func nanoTime(ts unix.Timespec) string {
	return time.Unix(ts.Sec, ts.Nsec).UTC().Format("2006-01-02T15:04:05.000000000")
}

// describeXattrs gives "xattr:name=value" for each xattr of p that keep
// selects, sorted by name.
func describeXattrs(p, rel string, keep func(rel, name string) bool) ([]string, error) {
	if keep == nil {
		return nil, nil
	}
	names, err := lxattrNames(p)
	if err != nil {
		return nil, err
	}
	slices.Sort(names)
	var out []string
	for _, n := range names {
		if !keep(rel, n) {
			continue
		}
		v, err := lxattrValue(p, n)
		if err != nil {
			return nil, err
		}
		out = append(out, fmt.Sprintf("xattr:%s=%q", n, v))
	}
	return out, nil
}

// lxattrNames lists the xattr names of p; none where the file system has
// no xattrs (ENOTSUP).
func lxattrNames(p string) ([]string, error) {
	buf, err := growing(func(b []byte) (int, error) { return unix.Llistxattr(p, b) })
	if errors.Is(err, unix.ENOTSUP) {
		return nil, nil
	}
	if err != nil || len(buf) == 0 {
		return nil, err
	}
	return strings.Split(strings.TrimRight(string(buf), "\x00"), "\x00"), nil
}

// lxattrValue reads the xattr name of p.
func lxattrValue(p, name string) ([]byte, error) {
	return growing(func(b []byte) (int, error) { return unix.Lgetxattr(p, name, b) })
}

// growing calls read with ever larger buffers until it fits. No size
// query first: fuse-overlayfs answers the query for an empty buffer with
// ERANGE.
func growing(read func([]byte) (int, error)) ([]byte, error) {
	for size := 256; ; size *= 4 {
		buf := make([]byte, size)
		n, err := read(buf)
		if errors.Is(err, unix.ERANGE) && size < 1<<24 {
			continue
		}
		if err != nil {
			return nil, err
		}
		return buf[:n], nil
	}
}

// TreeDiff lists how got differs from want, two results of Tree: paths
// missing from got, paths whose descriptions differ, and paths got has
// that want has not; sorted, empty when they are the same.
func TreeDiff(want, got map[string]string) []string {
	var d []string
	for k, v := range want {
		if g, ok := got[k]; !ok {
			d = append(d, fmt.Sprintf("missing %s (%s)", k, v))
		} else if g != v {
			d = append(d, fmt.Sprintf("differs %s:\n\twant %s\n\tgot  %s", k, v, g))
		}
	}
	for k, v := range got {
		if _, ok := want[k]; !ok {
			d = append(d, fmt.Sprintf("extra %s (%s)", k, v))
		}
	}
	slices.Sort(d)
	return d
}
