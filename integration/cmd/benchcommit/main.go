// Command benchcommit times `ctr snapshots diff` of a container's snapshot
// (issue 11): on an image of about 12,300 files, a container writes 3,000
// files, appends to 100 lower files, deletes 100 and chmods 50; then the diff
// of its snapshot against its parent is timed
//
//	(a) on fuse-overlayfs with our Compare (read from the upper directory),
//	(b) on fuse-overlayfs with containerd's walking differ (through FUSE),
//	(c) on overlayfs (kernel) with the walking differ,
//
// each run on a fresh containerd, variants alternating, medians of -reps.
// Run as root: make bench-commit.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"runtime"
	"strings"
	"time"

	"github.com/fosnap/fuseoverlayfs/integration/internal/benchchart"
	"github.com/fosnap/fuseoverlayfs/integration/internal/harness"
	"github.com/fosnap/fuseoverlayfs/integration/internal/images"
)

type variant struct {
	key, desc, snapshotter string
	walking                bool
	short                  string // for the chart
}

var variants = []variant{
	{"a", "fuse-overlayfs, our Compare", "fuse-overlayfs", false, "our Compare"},
	{"b", "fuse-overlayfs, walking differ (FUSE)", "fuse-overlayfs", true, "walking, FUSE"},
	{"c", "overlayfs (kernel), walking differ", "overlayfs", true, "overlayfs"},
}

// outDir is where the table and its chart are written.
var outDir *string

func main() {
	reps := flag.Int("reps", 5, "repetitions of each variant")
	base := flag.String("dir", os.TempDir(), "directory holding the containerd roots")
	outDir = flag.String("out", "", "directory for commit.md and commit.svg (default: docs/bench in the repository)")
	flag.Parse()
	if err := run(*reps, *base); err != nil {
		fmt.Fprintln(os.Stderr, "benchcommit:", err)
		os.Exit(1)
	}
}

func run(reps int, base string) error {
	bench, err := harness.StartBench(base, "bench/commit")
	if err != nil {
		return err
	}
	defer bench.Close()
	work, reg, ref := bench.Work, bench.Registry, bench.Ref
	samples := map[string][]float64{}
	for r := 1; r <= reps; r++ {
		for i := range variants {
			v := variants[(i+r-1)%len(variants)]
			s, n, err := measure(work, reg.Addr, ref, v)
			if err != nil {
				return fmt.Errorf("(%s) run %d: %w", v.key, r, err)
			}
			samples[v.key] = append(samples[v.key], s)
			fmt.Printf("run %d (%s) %-40s %6.2f s (%d bytes)\n", r, v.key, v.desc, s, n)
		}
	}
	var table strings.Builder
	fmt.Fprintf(&table, "\n`ctr snapshots diff` after the container's changes, medians of %d alternating runs (%d CPUs):\n\n", reps, runtime.NumCPU())
	fmt.Fprintf(&table, "| variant | snapshotter / comparer | median (s) | runs (s) |\n|---|---|---|---|\n")
	med := map[string]float64{}
	for _, v := range variants {
		med[v.key] = benchchart.Median(samples[v.key])
		var runs []string
		for _, s := range samples[v.key] {
			runs = append(runs, fmt.Sprintf("%.2f", s))
		}
		fmt.Fprintf(&table, "| (%s) | %s | %.2f | %s |\n", v.key, v.desc, med[v.key], strings.Join(runs, " "))
	}
	verdict := "meets"
	if med["a"] > 1.10*med["c"] {
		verdict = "MISSES"
	}
	fmt.Fprintf(&table, "\n| ratio | value | target |\n|---|---|---|\n| a/c | %.2f | <= 1.10: %s |\n| b/c | %.2f | (reported) |\n", med["a"]/med["c"], verdict, med["b"]/med["c"])
	fmt.Print(table.String())
	root, err := harness.RepoRoot()
	if err != nil {
		return err
	}
	var bars []benchchart.Bar
	for _, v := range variants {
		bars = append(bars, benchchart.Bar{Label: "(" + v.key + ") " + v.short, Median: med[v.key], Runs: samples[v.key]})
	}
	md, svg, err := benchchart.WriteReport(root, *outDir, "commit", table.String(), fmt.Sprintf("ctr snapshots diff, medians of %d runs", reps), bars)
	if err != nil {
		return err
	}
	fmt.Printf("\nwrote %s and %s\n", md, svg)
	return nil
}

// measure starts a fresh containerd, pulls the image, runs the container
// that changes it, and times `ctr snapshots diff` of its snapshot.
func measure(work, registry, ref string, v variant) (float64, int, error) {
	ctx := context.Background()
	dir, err := os.MkdirTemp(work, "c-")
	if err != nil {
		return 0, 0, err
	}
	c, err := harness.StartContainerd(ctx, harness.Options{Dir: dir, Registry: registry, Edit: func(cfg map[string]any) {
		if v.walking {
			harness.Set(cfg, []string{"walking"}, "plugins", "io.containerd.service.v1.diff-service", "default")
		}
	}})
	if err != nil {
		return 0, 0, err
	}
	var elapsed float64
	var n int
	err = func() error {
		if _, err := c.Ctr(ctx, "images", "pull", "--plain-http", "--snapshotter", v.snapshotter, "--platform", "linux/"+runtime.GOARCH, ref); err != nil {
			return err
		}
		if _, err := c.Ctr(ctx, "run", "--cgroup", "", "--snapshotter", v.snapshotter, ref, "bench", images.ProbePath, "scribble", "3000"); err != nil {
			return err
		}
		start := time.Now()
		out, err := c.Ctr(ctx, "snapshots", "--snapshotter", v.snapshotter, "diff", "bench")
		elapsed = time.Since(start).Seconds()
		n = len(out)
		if err != nil {
			return err
		}
		if !v.walking && !strings.Contains(c.LogTail(100000), "diff written from the upper directory") {
			return fmt.Errorf("our Compare was not used")
		}
		_, err = c.Ctr(ctx, "containers", "rm", "bench")
		return err
	}()
	if serr := c.Stop(); err == nil {
		err = serr
	}
	if rerr := harness.ReleaseRun(dir); err == nil {
		err = rerr
	}
	return elapsed, n, err
}
