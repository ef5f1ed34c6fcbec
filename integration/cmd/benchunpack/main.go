// Command benchunpack measures pull+unpack of one realistic image (built
// here, served by a local docker-registry) on a private containerd from bin/
// with the README configuration, in five variants:
//
//	(a) fuse-overlayfs, layers written directly by its differ, sequential
//	(b) the same, parallel (max_concurrent_unpacks, rebase at commit)
//	(c) fuse-overlayfs with the fast path off: containerd's walking differ,
//	    which writes through a FUSE mount (as the public snapshotter does)
//	(d) containerd's overlayfs snapshotter
//	(e) containerd's native snapshotter
//	(f) an unmodified containerd (bin/containerd-stock) with the snapshotter
//	    and its differ served by containerd-fuse-overlayfs-grpc through proxy
//	    plugins (config/containerd-proxy.toml), sequential
//
// Runs alternate between variants, each on a fresh containerd (no content
// cached), and the table gives the medians and the ratios a/d, b/d, c/a,
// f/d and f/c.
// Run it as root with `make bench-unpack`.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/fosnap/fuseoverlayfs/integration/internal/benchchart"
	"github.com/fosnap/fuseoverlayfs/integration/internal/harness"
)

type variant struct {
	key, desc   string
	short       string // for the chart
	snapshotter string
	unpacks     int
	direct      bool
	proxy       bool // containerd-stock + containerd-fuse-overlayfs-grpc
}

var variants = []variant{
	{"a", "fuse-overlayfs, direct apply, sequential", "direct", "fuse-overlayfs", 1, true, false},
	{"b", "fuse-overlayfs, direct apply, parallel", "parallel", "fuse-overlayfs", 4, true, false},
	{"c", "fuse-overlayfs, through FUSE (fast path off)", "through FUSE", "fuse-overlayfs", 1, false, false},
	{"d", "overlayfs (kernel)", "overlayfs", "overlayfs", 1, true, false},
	{"e", "native", "native", "native", 1, true, false},
	{"f", "containerd-stock + gRPC server, diff proxy", "proxy", "fuse-overlayfs", 1, true, true},
}

func main() {
	reps := flag.Int("reps", 5, "repetitions of each variant")
	only := flag.String("only", "abcdef", "variants to run")
	base := flag.String("dir", os.TempDir(), "directory holding the containerd roots")
	flag.StringVar(&outDir, "out", "", "directory for unpack.md and unpack.svg (default: docs/bench in the repository)")
	flag.StringVar(&profileDir, "profile", "", "directory for a CPU profile of containerd during each pull (<variant>-<run>.pprof; not for (f))")
	trees := flag.String("trees", "", "comma-separated host directories (e.g. /usr/local/go,/usr/share): pull an image of them, a layer each, instead of the benchmark image")
	flag.Parse()
	if err := run(*reps, *only, *base, *trees); err != nil {
		fmt.Fprintln(os.Stderr, "benchunpack:", err)
		os.Exit(1)
	}
}

func run(reps int, only, base, trees string) error {
	var treeList []string
	if trees != "" {
		treeList = strings.Split(trees, ",")
	}
	bench, err := harness.StartBench(base, "bench/unpack", treeList...)
	if err != nil {
		return err
	}
	defer bench.Close()
	work, reg, ref := bench.Work, bench.Registry, bench.Ref

	var vs []variant
	for _, v := range variants {
		if strings.Contains(only, v.key) {
			vs = append(vs, v)
		}
	}
	samples := map[string][]float64{}
	for r := 1; r <= reps; r++ {
		// Alternate, and rotate the order so no variant always goes first.
		for i := range vs {
			v := vs[(i+r-1)%len(vs)]
			s, err := measure(work, reg.Addr, ref, v)
			if err != nil {
				return fmt.Errorf("(%s) run %d: %w", v.key, r, err)
			}
			samples[v.key] = append(samples[v.key], s)
			fmt.Printf("run %d (%s) %-46s %6.2f s\n", r, v.key, v.desc, s)
		}
	}
	name, image := "unpack", "the benchmark image (images.Bench)"
	if trees != "" {
		name, image = "unpack-trees", "host trees "+trees+", a layer each, archived by GNU tar (images.HostTrees)"
	}
	return report(name, image, vs, samples, reps, work)
}

// measure starts a fresh containerd (and for a proxy variant the gRPC
// server), times `ctr images pull` (fetch and unpack) and stops them,
// checking that nothing is left mounted or running.
func measure(work, registry, ref string, v variant) (float64, error) {
	ctx := context.Background()
	dir, err := os.MkdirTemp(work, "c-")
	if err != nil {
		return 0, err
	}
	socket := filepath.Join(dir, "grpc", "grpc.sock")
	serverRoot := filepath.Join(dir, "fo-root")
	binary := "containerd" // ours, the plugin built in
	if v.proxy {
		binary = "containerd-stock"
	}
	var editErr error
	debugSocket := filepath.Join(dir, "debug.sock")
	c, err := harness.StartContainerd(ctx, harness.Options{Dir: dir, Registry: registry, Binary: binary, Edit: func(cfg map[string]any) {
		if profileDir != "" {
			harness.Set(cfg, debugSocket, "debug", "address")
		}
		if v.proxy {
			editErr = harness.UseProxyConfig(cfg, socket, serverRoot)
		}
		harness.Set(cfg, v.unpacks, "plugins", "io.containerd.transfer.v1.local", "max_concurrent_unpacks")
		if !v.direct {
			fastPathOff(cfg)
		}
	}})
	if err == nil {
		err = editErr
	}
	if err != nil {
		return 0, err
	}
	var server *harness.ProxyServer
	if v.proxy {
		server, err = harness.StartProxyServer(socket, serverRoot, filepath.Join(c.Root, harness.ContentSubdir), filepath.Join(dir, "grpc.log"))
		if err != nil {
			_ = c.Stop()
			return 0, err
		}
	}
	profile := startProfile(debugSocket, v)
	start := time.Now()
	_, err = c.Ctr(ctx, "images", "pull", "--plain-http", "--snapshotter", v.snapshotter, "--platform", "linux/"+runtime.GOARCH, ref)
	elapsed := time.Since(start).Seconds()
	if perr := profile(); err == nil {
		err = perr
	}
	if serr := c.Stop(); err == nil {
		err = serr
	}
	if server != nil {
		if serr := server.Stop(); err == nil {
			err = serr
		}
		if err == nil {
			err = checkServerApplied(server.LogPath)
		}
	}
	if rerr := harness.ReleaseRun(dir); err == nil {
		err = rerr
	}
	return elapsed, err
}

// checkServerApplied makes sure a proxy run measured the fast path: the
// server logs each layer it applied itself.
func checkServerApplied(logPath string) error {
	data, err := os.ReadFile(logPath)
	if err != nil {
		return err
	}
	if !strings.Contains(string(data), `level=info msg="layer applied directly"`) {
		return fmt.Errorf("containerd-fuse-overlayfs-grpc applied no layer (see %s): the proxy run did not use the fast path", logPath)
	}
	return nil
}

// fastPathOff points fuse-overlayfs' unpack at containerd's walking differ
// (which mounts the snapshot and writes through FUSE) and puts walking first
// in the diff service.
func fastPathOff(cfg map[string]any) {
	plugins, _ := cfg["plugins"].(map[string]any)
	transfer, _ := plugins["io.containerd.transfer.v1.local"].(map[string]any)
	if list, ok := transfer["unpack_config"].([]any); ok {
		for _, u := range list {
			if m, ok := u.(map[string]any); ok && m["snapshotter"] == "fuse-overlayfs" {
				m["differ"] = "walking"
			}
		}
	}
	harness.Set(cfg, []string{"walking"}, "plugins", "io.containerd.service.v1.diff-service", "default")
}

// outDir is where the table and its chart are written.
var outDir string

// report prints the table and writes it, with its chart, to outDir as
// name.md and name.svg.
func report(name, image string, vs []variant, samples map[string][]float64, reps int, work string) error {
	var table strings.Builder
	fmt.Fprintf(&table, "\nimage: %s\n", image)
	writeTable(&table, vs, samples, reps, work)
	fmt.Print(table.String())
	root, err := harness.RepoRoot()
	if err != nil {
		return err
	}
	var bars []benchchart.Bar
	for _, v := range vs {
		bars = append(bars, benchchart.Bar{Label: "(" + v.key + ") " + v.short, Median: benchchart.Median(samples[v.key]), Runs: samples[v.key]})
	}
	md, svg, err := benchchart.WriteReport(root, outDir, name, table.String(), fmt.Sprintf("pull + unpack, medians of %d runs", reps), bars)
	if err != nil {
		return err
	}
	fmt.Printf("\nwrote %s and %s\n", md, svg)
	return nil
}

// writeTable writes the machine, the medians and the ratios as Markdown.
func writeTable(w *strings.Builder, vs []variant, samples map[string][]float64, reps int, work string) {
	med := map[string]float64{}
	var uts unix.Utsname
	_ = unix.Uname(&uts)
	var sfs unix.Statfs_t
	_ = unix.Statfs(work, &sfs)
	fstype := map[int64]string{0xef53: "ext4", 0x01021994: "tmpfs", 0x58465342: "xfs", 0x9123683e: "btrfs"}[sfs.Type]
	fmt.Fprintf(w, "\nmachine: %d CPUs, kernel %s, roots on %s (%s)\n", runtime.NumCPU(), unix.ByteSliceToString(uts.Release[:]), work, fstype)
	fmt.Fprintf(w, "pull+unpack, medians of %d alternating runs:\n\n", reps)
	fmt.Fprintf(w, "| variant | snapshotter / apply | median (s) | runs (s) |\n|---|---|---|---|\n")
	for _, v := range vs {
		med[v.key] = benchchart.Median(samples[v.key])
		var runs []string
		for _, s := range samples[v.key] {
			runs = append(runs, fmt.Sprintf("%.2f", s))
		}
		fmt.Fprintf(w, "| (%s) | %s | %.2f | %s |\n", v.key, v.desc, med[v.key], strings.Join(runs, " "))
	}
	fmt.Fprintln(w)
	ratio := func(name, a, b string, target string, ok func(float64) bool) {
		if med[a] == 0 || med[b] == 0 {
			return
		}
		r := med[a] / med[b]
		if ok == nil {
			fmt.Fprintf(w, "| %s | %.2f | (reported) |\n", name, r)
			return
		}
		verdict := "meets"
		if !ok(r) {
			verdict = "MISSES"
		}
		fmt.Fprintf(w, "| %s | %.2f | target %s: %s |\n", name, r, target, verdict)
	}
	fmt.Fprintf(w, "| ratio | value | target |\n|---|---|---|\n")
	ratio("a/d", "a", "d", "<= 0.80", func(r float64) bool { return r <= 0.80 })
	ratio("b/d", "b", "d", "<= 0.80", func(r float64) bool { return r <= 0.80 })
	ratio("c/a", "c", "a", ">= 2", func(r float64) bool { return r >= 2 })
	ratio("f/d", "f", "d", "<= 1.10", func(r float64) bool { return r <= 1.10 })
	ratio("f/c", "f", "c", "", nil)
}
