package differ

import (
	"context"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/docker/go-metrics"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Unpack metrics, in the default Prometheus registry once RegisterMetrics
// ran (docs/operating.md, "Metrics"). path is "direct" (written straight
// into the layer directory) or "fallback" (ID-mapped mounts, through the
// fallback applier); mounts the differ declines are not counted.
var (
	metricsNS      = metrics.NewNamespace("containerd", "fuse_overlayfs", nil)
	durationBounds = []float64{0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120}
	unpacks        = metricsNS.NewLabeledCounter("unpacks", "layers applied, by path (direct, fallback) and result (ok, error)", "path", "result")
	unpackBytes    = metricsNS.NewLabeledCounter("unpacked_bytes", "uncompressed bytes of the layers applied, by path", "path")
	unpackDuration = metricsNS.NewLabeledTimerWithBuckets("unpack_duration", "time to apply one layer, by path", durationBounds, "path")
)

// Compare metrics, beside the unpack ones: path is "fast" (the tar written
// from the upper layer directory) or "fallback" (containerd's walking
// differ, for mounts the fast path does not handle); a Differ made by
// NewApplier, which compares nothing, counts nothing.
var (
	compares        = metricsNS.NewLabeledCounter("compares", "diffs computed (layers exported), by path (fast: from the upper directory; fallback: containerd's walking differ) and result (ok, error)", "path", "result")
	compareDuration = metricsNS.NewLabeledTimerWithBuckets("compare_duration", "time to compute one diff, by path", durationBounds, "path")
)

var registerOnce sync.Once

// RegisterMetrics adds the differ's unpack and compare metrics to the
// default Prometheus registry (github.com/docker/go-metrics), every series
// at 0 first; later calls do nothing. Importing the package registers
// nothing: the plugin and the gRPC server call this.
func RegisterMetrics() {
	registerOnce.Do(func() {
		for _, p := range []string{"fast", "fallback"} {
			for _, r := range []string{"ok", "error"} {
				compares.WithValues(p, r).Inc(0)
			}
		}
		for _, p := range []string{"direct", "fallback"} {
			for _, r := range []string{"ok", "error"} {
				unpacks.WithValues(p, r).Inc(0)
			}
			unpackBytes.WithValues(p).Inc(0)
		}
		metrics.Register(metricsNS)
	})
}

// Apply extracts the layer desc into the active snapshot the mounts belong
// to, and counts it. Mounts that are not this snapshotter's get
// errdefs.ErrNotImplemented; mounts that would write into a committed
// snapshot, a view or any other path in a root get
// errdefs.ErrFailedPrecondition (owner.go).
func (d *Differ) Apply(ctx context.Context, desc ocispec.Descriptor, mounts []mount.Mount, opts ...diff.ApplyOpt) (ocispec.Descriptor, error) {
	t, err := d.target(ctx, mounts)
	if err != nil {
		return ocispec.Descriptor{}, err // declined (not ours) or refused
	}
	path := "direct"
	if t.idmapped {
		path = "fallback"
	}
	start := time.Now()
	out, err := d.apply(ctx, t, desc, mounts, opts...)
	if path == "fallback" && d.fallback == nil {
		return out, err // declined too
	}
	result := "ok"
	if err != nil {
		result = "error"
	} else {
		unpackBytes.WithValues(path).Inc(float64(out.Size))
	}
	unpacks.WithValues(path, result).Inc()
	unpackDuration.WithValues(path).UpdateSince(start)
	return out, err
}

// countCompare counts one Compare by path, started at start.
func countCompare(path string, start time.Time, err error) {
	result := "ok"
	if err != nil {
		result = "error"
	}
	compares.WithValues(path, result).Inc()
	compareDuration.WithValues(path).UpdateSince(start)
}

// compareFallback is containerd's walking differ, counted.
func (d *Differ) compareFallback(ctx context.Context, lower, upper []mount.Mount, opts ...diff.Opt) (ocispec.Descriptor, error) {
	start := time.Now()
	desc, err := d.comparer.Compare(ctx, lower, upper, opts...)
	countCompare("fallback", start, err)
	return desc, err
}
