package differ

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// metricValue reads a counter or histogram count of the default registry
// (where the differ's metrics are), by full name and labels. A histogram
// shows up with its first observation: before that it counts 0.
func metricValue(t *testing.T, name string, labels map[string]string) float64 {
	t.Helper()
	families, err := prometheus.DefaultGatherer.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
	metric:
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if v, ok := labels[l.GetName()]; ok && v != l.GetValue() {
					continue metric
				}
			}
			if c := m.GetCounter(); c != nil {
				return c.GetValue()
			}
			return float64(m.GetHistogram().GetSampleCount())
		}
	}
	if strings.HasSuffix(name, "_seconds") {
		return 0
	}
	t.Fatalf("no metric %s%v", name, labels)
	return 0
}

// compareCounts are the Compare counters and duration counts, in the
// order fast ok, fast error, fallback ok, fallback error, fast duration,
// fallback duration.
func compareCounts(t *testing.T) [6]float64 {
	const c, h = "containerd_fuse_overlayfs_compares_total", "containerd_fuse_overlayfs_compare_duration_seconds"
	return [6]float64{
		metricValue(t, c, map[string]string{"path": "fast", "result": "ok"}),
		metricValue(t, c, map[string]string{"path": "fast", "result": "error"}),
		metricValue(t, c, map[string]string{"path": "fallback", "result": "ok"}),
		metricValue(t, c, map[string]string{"path": "fallback", "result": "error"}),
		metricValue(t, h, map[string]string{"path": "fast"}),
		metricValue(t, h, map[string]string{"path": "fallback"}),
	}
}

func checkCounts(t *testing.T, what string, before [6]float64, delta [6]float64) {
	t.Helper()
	after := compareCounts(t)
	for i := range after {
		if after[i]-before[i] != delta[i] {
			t.Errorf("%s: counts (fast ok, fast error, fallback ok, fallback error, fast durations, fallback durations) went from %v to %v, want a change of %v", what, before, after, delta)
			return
		}
	}
}

// TestCompareMetrics: a Compare of our mounts counts on the fast path (an
// error as an error), one of other mounts on the fallback path.
func TestCompareMetrics(t *testing.T) {
	testutil.RequireFUSE(t)
	RegisterMetrics()
	t.Cleanup(func() { testutil.RequireNoLeftovers(t, "TestCompareMetrics") })
	e := newEnv(t)
	dif := e.differ()
	e.unpack(t, dif, "base", "", "", layerTar(t, base...))
	upper, err := e.sn.Prepare(e.ctx, "ctr", "base")
	if err != nil {
		t.Fatal(err)
	}
	lower, err := e.sn.View(e.ctx, "ctr-lower", "base")
	if err != nil {
		t.Fatal(err)
	}

	before := compareCounts(t)
	if _, err := dif.Compare(e.ctx, lower, upper); err != nil {
		t.Fatal(err)
	}
	checkCounts(t, "our mounts", before, [6]float64{1, 0, 0, 0, 1, 0})

	before = compareCounts(t)
	if _, err := dif.Compare(e.ctx, lower, upper, diff.WithMediaType("application/x-bogus")); err == nil {
		t.Fatal("Compare with a media type nobody writes succeeded")
	}
	checkCounts(t, "our mounts, bad media type", before, [6]float64{0, 1, 0, 0, 1, 0})

	before = compareCounts(t)
	lowerDir, upperDir := t.TempDir(), t.TempDir()
	if err := os.WriteFile(filepath.Join(upperDir, "new"), []byte("n"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = dif.Compare(e.ctx,
		[]mount.Mount{{Type: "bind", Source: lowerDir, Options: []string{"ro", "rbind"}}},
		[]mount.Mount{{Type: "bind", Source: upperDir, Options: []string{"ro", "rbind"}}})
	if err != nil {
		t.Fatal(err)
	}
	checkCounts(t, "bind mounts of other directories", before, [6]float64{0, 0, 1, 0, 0, 1})
}

// TestImportRegistersNothing: importing the differ adds no metric to the
// default registry; RegisterMetrics adds them all at 0, and a second call is
// harmless.
func TestImportRegistersNothing(t *testing.T) {
	if registeredAtStart {
		t.Fatal("importing differ registered its metrics in the default registry")
	}
	RegisterMetrics()
	RegisterMetrics()
	for _, name := range []string{"containerd_fuse_overlayfs_compares_total", "containerd_fuse_overlayfs_unpacks_total"} {
		if v := metricValue(t, name, map[string]string{"path": "fallback", "result": "error"}); v != 0 {
			t.Fatalf("%s{fallback,error} = %v before any layer, want 0", name, v)
		}
	}
}

// registeredAtStart records, before any test runs, whether the package's
// metrics were already in the default registry.
var registeredAtStart = func() bool {
	families, err := prometheus.DefaultGatherer.Gather()
	if err != nil {
		return true
	}
	for _, f := range families {
		if strings.HasPrefix(f.GetName(), "containerd_fuse_overlayfs_") {
			return true
		}
	}
	return false
}()
