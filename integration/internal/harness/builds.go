package harness

import (
	"archive/tar"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/fosnap/fuseoverlayfs/integration/internal/images"
)

// BuildBaseRepo is the repository of the base image the BuildKit builds
// start FROM.
const BuildBaseRepo = "test/buildbase"

// Lower content of the base image that the deleting build removes or
// re-creates.
const (
	// OpaqueFiles is how many files /base/opq holds in the base image.
	OpaqueFiles = 50
	// KeepFiles is how many files /base/keep holds in the base image.
	KeepFiles = 20
)

// BuildBase returns the base image of the builds: busybox (the host's
// static one, Debian package busybox-static) as /bin/sh and its applets,
// the probe, and lower content under /base for the deleting build.
func BuildBase(probe []byte) (images.Spec, error) {
	busybox, err := LookPath("busybox")
	if err != nil {
		return images.Spec{}, fmt.Errorf("%w (install the Debian package busybox-static, e.g. `make deps`)", err)
	}
	body, err := os.ReadFile(busybox)
	if err != nil {
		return images.Spec{}, err
	}
	out, err := exec.Command(busybox, "--list").Output()
	if err != nil {
		return images.Spec{}, fmt.Errorf("busybox --list: %w", err)
	}
	l1 := images.Layer{
		images.Dir("bin", 0o755),
		{Path: "bin/busybox", Type: tar.TypeReg, Mode: 0o755, Body: body},
		{Path: "bin/probe", Type: tar.TypeReg, Mode: 0o755, Body: probe},
		images.Dir("etc", 0o755),
		images.File("etc/passwd", 0o644, "root:x:0:0:root:/root:/bin/sh\n"),
		images.File("etc/group", 0o644, "root:x:0:\n"),
		images.Dir("tmp", 0o1777),
	}
	for _, applet := range strings.Fields(string(out)) {
		if applet != "busybox" && !strings.Contains(applet, "/") {
			l1 = append(l1, images.Symlink("bin/"+applet, "busybox"))
		}
	}
	l2 := images.Layer{images.Dir("base", 0o755), images.Dir("base/opq", 0o755), images.Dir("base/keep", 0o755),
		images.Dir("base/gone", 0o755), images.Dir("base/gone/sub", 0o700), images.File("base/gone/sub/f", 0o600, "gone\n")}
	for i := 1; i <= OpaqueFiles; i++ {
		l2 = append(l2, images.File(fmt.Sprintf("base/opq/o%d", i), 0o644, fmt.Sprintf("lower opq %d\n", i)))
	}
	for i := 1; i <= KeepFiles; i++ {
		l2 = append(l2, images.File(fmt.Sprintf("base/keep/k%d", i), 0o644, fmt.Sprintf("keep %d\n", i)))
	}
	return images.Spec{Repo: BuildBaseRepo, Tag: "1", Layers: []images.Layer{l1, l2}, Cmd: []string{"/bin/sh"}}, nil
}

// BuildCase is one Dockerfile build: its Dockerfile and, for a COPY of a
// large context, the context's files.
type BuildCase struct {
	// Name is short and unique ("run", "copy", "multistage", "delete").
	Name string
	// Dockerfile's text; FROM lines name the base image.
	Dockerfile string
	// ContextFiles is how many files WriteContext puts under ctx/ (0: none).
	ContextFiles int
}

// filesPerDir spreads generated files over directories of this many.
const filesPerDir = 100

// genScript is a shell line that writes n files of a few bytes each under
// dir, filesPerDir to a subdirectory d<i>/f<j>.
func genScript(dir string, n int) string {
	dirs := (n + filesPerDir - 1) / filesPerDir
	return fmt.Sprintf(`mkdir -p %[1]s && cd %[1]s && for d in $(seq 1 %[2]d); do mkdir d$d && for f in $(seq 1 %[3]d); do echo "$d $f" > d$d/f$f; done; done`,
		dir, dirs, filesPerDir)
}

// BuildCases returns the four builds of issue 17 with about n generated
// files each (n a multiple of 100), all FROM base (an image reference):
//
//	run:        RUN writing n files
//	copy:       COPY of an n-file context
//	multistage: n files written in one stage, COPY --from into another
//	delete:     deletions, and /base/opq removed and re-created
func BuildCases(base string, n int) []BuildCase {
	return []BuildCase{
		{Name: "run", Dockerfile: fmt.Sprintf("FROM %s\nRUN %s\n", base, genScript("/out", n))},
		{Name: "copy", Dockerfile: fmt.Sprintf("FROM %s\nCOPY ctx /ctx\n", base), ContextFiles: n},
		{Name: "multistage", Dockerfile: fmt.Sprintf("FROM %s AS gen\nRUN %s\n\nFROM %s\nCOPY --from=gen /gen /copied\nRUN rm /copied/d1/f1\n",
			base, genScript("/gen", n), base)},
		{Name: "delete", Dockerfile: fmt.Sprintf(`FROM %s
RUN rm -rf /base/opq && mkdir /base/opq && touch /base/opq/only
RUN rm /base/keep/k1 /base/keep/k2 && rm -rf /base/gone
RUN mkdir /base/keep/newdir && echo new > /base/keep/newdir/file && echo changed > /base/keep/k3
`, base)},
	}
}

// WriteContext writes the build's Dockerfile and context files into dir:
// ctx/d<i>/f<j>, sizes 0 to 4 KiB.
func (b BuildCase) WriteContext(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "Dockerfile"), []byte(b.Dockerfile), 0o644); err != nil {
		return err
	}
	for i := 0; i < b.ContextFiles; i++ {
		sub := filepath.Join(dir, "ctx", fmt.Sprintf("d%d", i/filesPerDir+1))
		if i%filesPerDir == 0 {
			if err := os.MkdirAll(sub, 0o755); err != nil {
				return err
			}
		}
		body := strings.Repeat(fmt.Sprintf("%d.", i), 1+(i*37)%4096/(len(fmt.Sprint(i))+1))
		if err := os.WriteFile(filepath.Join(sub, fmt.Sprintf("f%d", i%filesPerDir+1)), []byte(body), 0o644); err != nil {
			return err
		}
	}
	return nil
}
