package images

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"os/exec"
	"path/filepath"
	"strings"
)

// HostTrees is an image whose layers are trees of this host (for example
// /usr/local/go, /usr/share), one layer per tree, archived by GNU tar: an
// input that neither our tar writer nor our choice of files made, to check
// a benchmark figure against. It returns the spec, the number of entries
// and the bytes of the tars.
func HostTrees(repo string, trees []string) (Spec, int, int64, error) {
	spec := Spec{Repo: repo, Tag: "latest"}
	var entries int
	var size int64
	for _, tree := range trees {
		if !filepath.IsAbs(tree) {
			return Spec{}, 0, 0, fmt.Errorf("tree %q: want an absolute path", tree)
		}
		rel := strings.TrimPrefix(filepath.Clean(tree), "/")
		// --format=posix: PAX headers, as BuildKit and containerd write them.
		var out, errb bytes.Buffer
		cmd := exec.Command("tar", "--format=posix", "--numeric-owner", "-C", "/", "-cf", "-", rel)
		cmd.Stdout, cmd.Stderr = &out, &errb
		if err := cmd.Run(); err != nil {
			return Spec{}, 0, 0, fmt.Errorf("tar %s: %w: %s", tree, err, errb.String())
		}
		n, err := countEntries(out.Bytes())
		if err != nil {
			return Spec{}, 0, 0, fmt.Errorf("read the tar of %s: %w", tree, err)
		}
		entries += n
		size += int64(out.Len())
		spec.Tars = append(spec.Tars, out.Bytes())
	}
	return spec, entries, size, nil
}

func countEntries(data []byte) (int, error) {
	tr := tar.NewReader(bytes.NewReader(data))
	for n := 0; ; n++ {
		if _, err := tr.Next(); err == io.EOF {
			return n, nil
		} else if err != nil {
			return n, err
		}
	}
}
