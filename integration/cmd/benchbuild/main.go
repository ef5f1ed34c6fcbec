// Command benchbuild times BuildKit builds (issue 17) with buildkitd's
// containerd worker
//
//	(a) on fuse-overlayfs, exports through our Compare (the diff-service
//	    default of config/containerd.toml),
//	(b) on overlayfs (kernel), exports through BuildKit's overlay differ,
//
// for the four builds: RUN writing -files files, COPY of a -files-file
// context, multi-stage COPY --from of -files files, and the deleting build
// (deletions, a directory removed and re-created over 50 lower files). Each
// run starts a fresh containerd and buildkitd (no build cache), pulls the
// small base image from a local registry as part of the build, and times
// `buildctl build` up to the image stored in containerd (no push). Variants
// alternate; medians of -reps. Run as root: make bench-build.
//
// -builds picks some of the builds; -options adds, for each ';'-separated
// list of fuse-overlayfs options, a variant (a1, a2, ...) that is (a) with
// the snapshotter's mount_options set to that list. -logs keeps each run's
// containerd log (with the snapshotter's debug lines of the mounts it hands
// out) in that directory.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/fosnap/fuseoverlayfs/integration/internal/benchchart"
	"github.com/fosnap/fuseoverlayfs/integration/internal/harness"
	"github.com/fosnap/fuseoverlayfs/integration/internal/images"
)

type variant struct {
	key, desc, snapshotter string
	options                []string // fuse-overlayfs mount_options
}

var variants = []variant{
	{"a", "fuse-overlayfs, our Compare", "fuse-overlayfs", nil},
	{"b", "overlayfs (kernel), BuildKit's overlay differ", "overlayfs", nil},
}

// addOptionVariants appends a variant of (a) for each ';'-separated list
// of comma-separated fuse-overlayfs options in spec.
func addOptionVariants(spec string) {
	if spec == "" {
		return
	}
	for i, list := range strings.Split(spec, ";") {
		opts := strings.Split(list, ",")
		variants = append(variants, variant{
			key:         fmt.Sprintf("a%d", i+1),
			desc:        "(a) with mount_options " + strings.Join(opts, ","),
			snapshotter: "fuse-overlayfs",
			options:     opts,
		})
	}
}

// pickCases keeps the builds named in the comma-separated list names
// (all when empty).
func pickCases(cases []harness.BuildCase, names string) ([]harness.BuildCase, error) {
	if names == "" {
		return cases, nil
	}
	var out []harness.BuildCase
	for _, name := range strings.Split(names, ",") {
		found := false
		for _, bc := range cases {
			if bc.Name == name {
				out, found = append(out, bc), true
			}
		}
		if !found {
			return nil, fmt.Errorf("no build named %q", name)
		}
	}
	return out, nil
}

func main() {
	reps := flag.Int("reps", 5, "repetitions of each variant and build")
	files := flag.Int("files", 20000, "files each generating build writes or copies (a multiple of 100)")
	base := flag.String("dir", os.TempDir(), "directory holding the containerd and buildkitd roots")
	out := flag.String("out", "", "directory for build.md and build.svg (default: docs/bench in the repository)")
	builds := flag.String("builds", "", "comma-separated builds to run (run, copy, multistage, delete; default all)")
	options := flag.String("options", "", "';'-separated lists of fuse-overlayfs options, each an extra variant of (a)")
	flag.StringVar(&logDir, "logs", "", "directory to keep each run's containerd log in")
	flag.Parse()
	addOptionVariants(*options)
	if err := run(*reps, *files, *base, *out, *builds); err != nil {
		fmt.Fprintln(os.Stderr, "benchbuild:", err)
		os.Exit(1)
	}
}

// setup is what every measurement shares: the work directory, the
// registry with the base image, and the builds' contexts.
type setup struct {
	work, registry, base string
	cases                []harness.BuildCase
	dirs                 map[string]string // build name -> context directory
}

// logDir, when set, keeps each run's containerd log.
var logDir string

func run(reps, files int, baseDir, outDir, builds string) error {
	if os.Getuid() != 0 {
		return fmt.Errorf("run as root")
	}
	if missing := harness.Missing(); len(missing) > 0 {
		return fmt.Errorf("missing: %s (make deps binaries)", strings.Join(missing, ", "))
	}
	work, err := os.MkdirTemp(baseDir, "bench-build-")
	if err != nil {
		return err
	}
	defer func() { _ = os.RemoveAll(work) }()
	s, reg, err := prepare(work, files)
	if reg != nil {
		defer func() { _ = reg.Stop() }()
	}
	if err != nil {
		return err
	}
	if s.cases, err = pickCases(s.cases, builds); err != nil {
		return err
	}
	loadStart := loadAverage()
	samples := map[string][]float64{} // build/variant -> seconds
	exports := map[string][]float64{} // build/variant -> seconds of "exporting layers"
	for r := 1; r <= reps; r++ {
		for _, bc := range s.cases {
			for i := range variants {
				v := variants[(i+r-1)%len(variants)]
				secs, export, err := measure(s, bc, v)
				if err != nil {
					return fmt.Errorf("%s (%s) run %d: %w", bc.Name, v.key, r, err)
				}
				samples[bc.Name+"/"+v.key] = append(samples[bc.Name+"/"+v.key], secs)
				exports[bc.Name+"/"+v.key] = append(exports[bc.Name+"/"+v.key], export)
				fmt.Printf("run %d %-10s (%s) %-48s %7.2f s (export %.2f s)\n", r, bc.Name, v.key, v.desc, secs, export)
			}
		}
	}
	return report(s, reps, files, samples, exports, outDir, loadStart+" at the start, "+loadAverage()+" at the end")
}

// loadAverage is the 1, 5 and 15 minute load average: medians from a busy
// machine say less, and the table says how busy it was.
func loadAverage() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(data))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

// prepare starts the registry, pushes the base image and writes the
// builds' contexts.
func prepare(work string, files int) (*setup, *harness.Registry, error) {
	probe, err := harness.BuildProbe(work)
	if err != nil {
		return nil, nil, err
	}
	spec, err := harness.BuildBase(probe)
	if err != nil {
		return nil, nil, err
	}
	reg, err := harness.StartRegistry(filepath.Join(work, "registry"))
	if err != nil {
		return nil, nil, err
	}
	base, err := images.Push(reg.Addr, spec)
	if err != nil {
		return nil, reg, err
	}
	s := &setup{work: work, registry: reg.Addr, base: base, cases: harness.BuildCases(base, files), dirs: map[string]string{}}
	for _, bc := range s.cases {
		dir := filepath.Join(work, "ctx-"+bc.Name)
		if err := bc.WriteContext(dir); err != nil {
			return nil, reg, err
		}
		s.dirs[bc.Name] = dir
	}
	return s, reg, nil
}

// exportDone is buildctl's plain progress line for the end of the layer
// export (the diffs), with its duration when it took 0.1 s or more.
var exportDone = regexp.MustCompile(`exporting layers (?:([0-9.]+)s )?done`)

// exportSeconds sums the export durations in buildctl's progress output.
func exportSeconds(progress string) float64 {
	var total float64
	for _, m := range exportDone.FindAllStringSubmatch(progress, -1) {
		if v, err := strconv.ParseFloat(m[1], 64); err == nil {
			total += v
		}
	}
	return total
}

// measure starts a fresh containerd and buildkitd on v's snapshotter and
// times one build; it also returns the time BuildKit reports for
// exporting the layers.
func measure(s *setup, bc harness.BuildCase, v variant) (float64, float64, error) {
	ctx := context.Background()
	dir, err := os.MkdirTemp(s.work, "c-")
	if err != nil {
		return 0, 0, err
	}
	c, err := harness.StartContainerd(ctx, harness.Options{Dir: dir, Registry: s.registry, Edit: func(cfg map[string]any) {
		if v.options != nil {
			harness.Set(cfg, v.options, "plugins", "io.containerd.snapshotter.v1.fuse-overlayfs", "mount_options")
		}
	}})
	if err != nil {
		return 0, 0, err
	}
	var elapsed, export float64
	err = func() error {
		bk, err := harness.StartBuildkitd(ctx, harness.BuildkitOptions{
			Dir: filepath.Join(dir, "bk"), Containerd: c.Address, Snapshotter: v.snapshotter, Registry: s.registry,
		})
		if err != nil {
			return err
		}
		start := time.Now()
		progress, err := bk.Build(ctx, s.dirs[bc.Name], "type=image,name=bench/"+bc.Name+":1")
		elapsed = time.Since(start).Seconds()
		export = exportSeconds(progress)
		if serr := bk.Stop(); err == nil {
			err = serr
		}
		if err != nil {
			return err
		}
		if v.snapshotter == harness.SnapshotterID && !strings.Contains(c.LogTail(1<<30), "diff written from the upper directory") {
			return fmt.Errorf("our Compare was not used")
		}
		return nil
	}()
	if serr := c.Stop(); err == nil {
		err = serr
	}
	if logDir != "" {
		name := fmt.Sprintf("%s-%s-%s.log", bc.Name, v.key, filepath.Base(dir))
		if werr := os.WriteFile(filepath.Join(logDir, name), []byte(c.LogTail(1<<30)), 0o644); err == nil {
			err = werr
		}
	}
	if rerr := harness.ReleaseRun(dir); err == nil {
		err = rerr
	}
	return elapsed, export, err
}

// report prints the table and writes it with its chart.
func report(s *setup, reps, files int, samples, exports map[string][]float64, outDir, load string) error {
	var table strings.Builder
	fmt.Fprintf(&table, "\n`buildctl build` with BuildKit's containerd worker, fresh daemons, %d files per generating build, medians of %d alternating runs (%d CPUs, load average %s):\n\n", files, reps, runtime.NumCPU(), load)
	fmt.Fprintf(&table, "(a) %s; (b) %s.\n\n", variants[0].desc, variants[1].desc)
	fmt.Fprintf(&table, "Export: BuildKit's \"exporting layers\" step (the diffs), median.\n\n")
	fmt.Fprintf(&table, "| build | (a) median (s) | (b) median (s) | a/b | export a (s) | export b (s) | runs a (s) | runs b (s) |\n|---|---|---|---|---|---|---|---|\n")
	var bars []benchchart.Bar
	for _, bc := range s.cases {
		a, b := samples[bc.Name+"/a"], samples[bc.Name+"/b"]
		ma, mb := benchchart.Median(a), benchchart.Median(b)
		ea, eb := benchchart.Median(exports[bc.Name+"/a"]), benchchart.Median(exports[bc.Name+"/b"])
		fmt.Fprintf(&table, "| %s | %.2f | %.2f | %.2f | %.2f | %.2f | %s | %s |\n", bc.Name, ma, mb, ma/mb, ea, eb, runs(a), runs(b))
		bars = append(bars,
			benchchart.Bar{Label: bc.Name + " (a) ours", Median: ma, Runs: a},
			benchchart.Bar{Label: bc.Name + " (b) overlayfs", Median: mb, Runs: b})
	}
	optionsTable(&table, s.cases, samples)
	fmt.Print(table.String())
	root, err := harness.RepoRoot()
	if err != nil {
		return err
	}
	md, svg, err := benchchart.WriteReport(root, outDir, "build", table.String(), fmt.Sprintf("buildctl build, medians of %d runs", reps), bars)
	if err != nil {
		return err
	}
	fmt.Printf("\nwrote %s and %s\n", md, svg)
	return nil
}

// optionsTable adds, when -options gave variants, their medians against
// (a) and (b).
func optionsTable(table *strings.Builder, cases []harness.BuildCase, samples map[string][]float64) {
	if len(variants) <= 2 {
		return
	}
	fmt.Fprintf(table, "\nVariants of (a):\n\n| build | variant | median (s) | /a | /b | runs (s) |\n|---|---|---|---|---|---|\n")
	for _, bc := range cases {
		ma, mb := benchchart.Median(samples[bc.Name+"/a"]), benchchart.Median(samples[bc.Name+"/b"])
		for _, v := range variants[2:] {
			xs := samples[bc.Name+"/"+v.key]
			m := benchchart.Median(xs)
			fmt.Fprintf(table, "| %s | %s: %s | %.2f | %.2f | %.2f | %s |\n", bc.Name, v.key, strings.Join(v.options, ","), m, m/ma, m/mb, runs(xs))
		}
	}
}

func runs(xs []float64) string {
	var out []string
	for _, x := range xs {
		out = append(out, fmt.Sprintf("%.2f", x))
	}
	return strings.Join(out, " ")
}
