// Command probe is the program that the end-to-end tests and the demo put
// into their images: a static binary (CGO_ENABLED=0) with a few small
// subcommands, so that test images need no shell or libc.
//
//	probe echo WORDS...       print the words
//	probe cat FILE...         print files
//	probe write FILE TEXT     create FILE holding TEXT
//	probe treedump DIR        print one line per file below DIR (see below)
//	probe pause               wait for SIGTERM or SIGINT, then exit 0
//	probe show FILE...        print files, then "ready", then pause
//	probe churn FILE          until SIGTERM or SIGINT: write a growing counter
//	                          to FILE (via FILE.tmp and a rename) and read it
//	                          back; exit 3 on the first error
package main

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

func main() {
	if len(os.Args) < 2 {
		fail("usage: probe echo|cat|write|edit|treedump|pause|show ARGS...")
	}
	args := os.Args[2:]
	switch os.Args[1] {
	case "echo":
		fmt.Println(strings.Join(args, " "))
	case "cat":
		catFiles(args)
	case "write":
		if len(args) != 2 {
			fail("usage: probe write FILE TEXT")
		}
		if err := os.WriteFile(args[0], []byte(args[1]), 0o644); err != nil {
			fail(err.Error())
		}
	case "edit":
		// edit FILE TEXT [PATH...]: writes FILE and removes each PATH with
		// what it holds (a container's changes for the commit tests).
		if len(args) < 2 {
			fail("usage: probe edit FILE TEXT [PATH...]")
		}
		if err := os.WriteFile(args[0], []byte(args[1]), 0o644); err != nil {
			fail(err.Error())
		}
		for _, p := range args[2:] {
			if err := os.RemoveAll(p); err != nil {
				fail(err.Error())
			}
		}
	case "scribble":
		// scribble N: a container's changes for the commit benchmark: N new
		// files, appends to 100 lower files, 100 deleted, 50 chmodded.
		if len(args) != 1 {
			fail("usage: probe scribble N")
		}
		if err := scribble(args[0]); err != nil {
			fail(err.Error())
		}
	case "treedump":
		if len(args) != 1 {
			fail("usage: probe treedump DIR")
		}
		if err := treedump(os.Stdout, args[0]); err != nil {
			fail(err.Error())
		}
	case "pause":
		pause()
	case "churn":
		if len(args) != 1 {
			fail("usage: probe churn FILE")
		}
		churn(args[0])
	case "show":
		catFiles(args)
		fmt.Println("ready")
		pause()
	default:
		fail("unknown subcommand " + os.Args[1])
	}
}

// churn writes and reads back a counter in file until SIGTERM or SIGINT.
func churn(file string) {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	for n := 1; ; n++ {
		select {
		case <-stop:
			return
		default:
		}
		want := strconv.Itoa(n)
		if err := os.WriteFile(file+".tmp", []byte(want), 0o644); err != nil {
			churnFail(err)
		}
		if err := os.Rename(file+".tmp", file); err != nil {
			churnFail(err)
		}
		got, err := os.ReadFile(file)
		if err != nil {
			churnFail(err)
		}
		if string(got) != want {
			churnFail(fmt.Errorf("read %q back, wrote %q", got, want))
		}
		time.Sleep(20 * time.Millisecond) // a steady workload, not a busy loop
	}
}

func churnFail(err error) {
	fmt.Fprintln(os.Stderr, "probe churn:", err)
	os.Exit(3)
}

func fail(msg string) {
	fmt.Fprintln(os.Stderr, "probe:", msg)
	os.Exit(2)
}

func catFiles(files []string) {
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			fail(err.Error())
		}
		_, _ = os.Stdout.Write(data)
	}
}

// pause is PID 1 of a pod sandbox or a long-running container: it must exit
// on the stop signal (PID 1 gets no default signal handling).
func pause() {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGTERM, syscall.SIGINT)
	<-ch
}

// treedump prints, sorted by path, one line per entry below root:
//
//	path type mode uid gid size sha256 link xattrs
//
// mode is the octal permission bits including setuid/setgid/sticky; size and
// sha256 are given for regular files and symlinks only ("-" otherwise), since
// a directory's size depends on the file system that stores it. Mount points
// other than root (/proc, /dev, /sys, runtime-provided files) are left out
// with everything below them: they are not part of the image.
func treedump(w io.Writer, root string) error {
	mounts, err := mountPoints()
	if err != nil {
		return err
	}
	root = filepath.Clean(root)
	var lines []string
	err = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if path != root && mounts[path] {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		line, err := describe(root, path)
		if err != nil {
			return err
		}
		lines = append(lines, line)
		return nil
	})
	if err != nil {
		return err
	}
	sort.Strings(lines)
	bw := bufio.NewWriter(w)
	for _, l := range lines {
		if _, err := fmt.Fprintln(bw, l); err != nil {
			return err
		}
	}
	return bw.Flush()
}

func describe(root, path string) (string, error) {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return "", fmt.Errorf("lstat %s: %w", path, err)
	}
	rel, _ := filepath.Rel(root, path)
	name := "/" + filepath.ToSlash(rel)
	if rel == "." {
		name = "/"
	}
	size, sum, link := "-", "-", "-"
	var typ string
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		typ = "file"
		size = strconv.FormatInt(st.Size, 10)
		h, err := hashFile(path)
		if err != nil {
			return "", err
		}
		sum = h
	case unix.S_IFDIR:
		typ = "dir"
	case unix.S_IFLNK:
		typ = "symlink"
		target, err := os.Readlink(path)
		if err != nil {
			return "", err
		}
		link = strconv.Quote(target)
		size = strconv.FormatInt(st.Size, 10)
	case unix.S_IFIFO:
		typ = "fifo"
	case unix.S_IFCHR:
		typ = fmt.Sprintf("char(%d,%d)", unix.Major(st.Rdev), unix.Minor(st.Rdev))
	case unix.S_IFBLK:
		typ = fmt.Sprintf("block(%d,%d)", unix.Major(st.Rdev), unix.Minor(st.Rdev))
	case unix.S_IFSOCK:
		typ = "socket"
	default:
		typ = "unknown"
	}
	xattrs, err := listXattrs(path)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%s %s %04o %d %d %s %s %s %s", strconv.Quote(name), typ,
		st.Mode&0o7777, st.Uid, st.Gid, size, sum, link, xattrs), nil
}

func hashFile(path string) (string, error) {
	f, err := os.Open(path)
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

// listXattrs returns name=hex(value) pairs, sorted, or "-" when there are none.
func listXattrs(path string) (string, error) {
	size, err := unix.Llistxattr(path, nil)
	if err != nil {
		if err == unix.ENOTSUP {
			return "-", nil
		}
		return "", fmt.Errorf("llistxattr %s: %w", path, err)
	}
	if size == 0 {
		return "-", nil
	}
	buf := make([]byte, size)
	size, err = unix.Llistxattr(path, buf)
	if err != nil {
		return "", fmt.Errorf("llistxattr %s: %w", path, err)
	}
	var pairs []string
	for _, name := range strings.Split(strings.TrimRight(string(buf[:size]), "\x00"), "\x00") {
		if name == "" {
			continue
		}
		vsize, err := unix.Lgetxattr(path, name, nil)
		if err != nil {
			return "", fmt.Errorf("lgetxattr %s %s: %w", path, name, err)
		}
		val := make([]byte, vsize)
		if vsize > 0 {
			vsize, err = unix.Lgetxattr(path, name, val)
			if err != nil {
				return "", fmt.Errorf("lgetxattr %s %s: %w", path, name, err)
			}
		}
		pairs = append(pairs, name+"="+hex.EncodeToString(val[:vsize]))
	}
	if len(pairs) == 0 {
		// fuse-overlayfs 1.10 leaves an empty name in the list for each
		// xattr it hides (its opaque marker): no visible xattr.
		return "-", nil
	}
	sort.Strings(pairs)
	return strings.Join(pairs, ","), nil
}

// mountPoints reads this process's mount points from /proc/self/mountinfo.
func mountPoints() (map[string]bool, error) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	points := map[string]bool{}
	for _, line := range strings.Split(string(data), "\n") {
		fields := strings.Fields(line)
		if len(fields) < 5 {
			continue
		}
		points[unescape(fields[4])] = true
	}
	return points, nil
}

func unescape(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func scribble(arg string) error {
	var n int
	if _, err := fmt.Sscan(arg, &n); err != nil {
		return err
	}
	for i := 0; i < n; i++ {
		dir := fmt.Sprintf("/scribble/d%02d", i/100)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(fmt.Sprintf("%s/f%04d", dir, i), []byte(strings.Repeat("scribbled ", 100+i%400)), 0o644); err != nil {
			return err
		}
	}
	for i := 0; i < 100; i++ {
		f, err := os.OpenFile(fmt.Sprintf("/app/lib/pkg%03d/m%03d.dat", i, (i+50)%100), os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			return err
		}
		_, err = f.WriteString("appended\n")
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
		if err := os.Remove(fmt.Sprintf("/app/lib/pkg%03d/m%03d.dat", i, (i+60)%100)); err != nil {
			return err
		}
		if i < 50 {
			if err := os.Chmod(fmt.Sprintf("/app/lib/pkg%03d/m%03d.dat", i, (i+70)%100), 0o600); err != nil {
				return err
			}
		}
	}
	return nil
}
