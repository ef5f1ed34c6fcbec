package harness

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/fosnap/fuseoverlayfs/integration/internal/images"
)

// Bench is what a benchmark runs against: its work directory, a local
// registry and the benchmark image pushed to it.
type Bench struct {
	Work     string
	Registry *Registry
	Ref      string
}

// StartBench checks the prerequisites (root, bin/ and host packages), makes
// a work directory in base, builds the benchmark image (images.Bench) as
// repo, or with trees an image of those host trees (images.HostTrees), and
// pushes it to a fresh local registry. Close ends it all.
func StartBench(base, repo string, trees ...string) (*Bench, error) {
	if os.Getuid() != 0 {
		return nil, fmt.Errorf("run as root")
	}
	if missing := Missing(); len(missing) > 0 {
		return nil, fmt.Errorf("missing: %s (make deps binaries)", strings.Join(missing, ", "))
	}
	work, err := os.MkdirTemp(base, strings.ReplaceAll(repo, "/", "-")+"-")
	if err != nil {
		return nil, err
	}
	b := &Bench{Work: work}
	if err := b.start(repo, trees); err != nil {
		b.Close()
		return nil, err
	}
	return b, nil
}

func (b *Bench) start(repo string, trees []string) error {
	spec, err := b.image(repo, trees)
	if err != nil {
		return err
	}
	if b.Registry, err = StartRegistry(filepath.Join(b.Work, "registry")); err != nil {
		return err
	}
	start := time.Now()
	if b.Ref, err = images.Push(b.Registry.Addr, spec); err != nil {
		return err
	}
	fmt.Printf("built and pushed %s in %.1f s\n", b.Ref, time.Since(start).Seconds())
	return nil
}

// image is the benchmark image, or with trees the image of those trees.
func (b *Bench) image(repo string, trees []string) (images.Spec, error) {
	if len(trees) > 0 {
		spec, entries, size, err := images.HostTrees(repo, trees)
		if err == nil {
			fmt.Printf("image of %s: %d layers, %d entries, %.0f MB of tar\n", strings.Join(trees, " "), len(spec.Tars), entries, float64(size)/1e6)
		}
		return spec, err
	}
	probe, err := BuildProbe(b.Work)
	if err != nil {
		return images.Spec{}, err
	}
	spec, files, size := images.Bench(probe, repo)
	fmt.Printf("image: %d layers, %d files, %.0f MB uncompressed\n", len(spec.Layers), files, float64(size)/1e6)
	return spec, nil
}

// Close stops the registry and removes the work directory.
func (b *Bench) Close() {
	if b.Registry != nil {
		_ = b.Registry.Stop()
	}
	_ = os.RemoveAll(b.Work)
}

// ReleaseRun ends one benchmark run in dir, after its containerd stopped:
// it waits up to 15 s for the run's mounts and fuse-overlayfs servers to go,
// removes (and reports) any left behind, then removes dir. The error is the
// first of these that failed.
func ReleaseRun(dir string) error {
	left, err := WaitNoLeftovers(dir, 15*time.Second)
	if err == nil && !left.Empty() {
		_ = CleanLeftovers(left)
		err = fmt.Errorf("left behind: %s", left)
	}
	if rerr := os.RemoveAll(dir); err == nil {
		err = rerr
	}
	return err
}
