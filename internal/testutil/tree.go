package testutil

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// TreeSum hashes a directory tree: names, types, modes, owners, sizes,
// contents, link targets, device numbers and xattrs.
func TreeSum(root string) (string, error) {
	h := sha256.New()
	err := filepath.Walk(root, func(path string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		st := fi.Sys().(*syscall.Stat_t)
		_, _ = fmt.Fprintf(h, "%s %o %d %d %d %d\n", rel, st.Mode, st.Uid, st.Gid, st.Rdev, fi.Size())
		switch {
		case fi.Mode()&os.ModeSymlink != 0:
			target, err := os.Readlink(path)
			if err != nil {
				return err
			}
			_, _ = fmt.Fprintf(h, "-> %s\n", target)
		case fi.Mode().IsRegular():
			f, err := os.Open(path)
			if err != nil {
				return err
			}
			_, err = io.Copy(h, f)
			_ = f.Close()
			if err != nil {
				return err
			}
		}
		buf := make([]byte, 64*1024)
		if n, err := unix.Llistxattr(path, buf); err == nil && n > 0 {
			names := strings.Split(strings.TrimRight(string(buf[:n]), "\x00"), "\x00")
			slices.Sort(names)
			for _, name := range names {
				v := make([]byte, 64*1024)
				m, _ := unix.Lgetxattr(path, name, v)
				_, _ = fmt.Fprintf(h, "x %s=%x\n", name, v[:max(m, 0)])
			}
		}
		return nil
	})
	return hex.EncodeToString(h.Sum(nil)), err
}
