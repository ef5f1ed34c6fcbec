//go:build linux

package fuseoverlayfs

import (
	"context"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
	"github.com/docker/go-metrics"
	"github.com/prometheus/client_golang/prometheus"
)

// Metrics of the snapshotter, registered with the default Prometheus
// registry as containerd's own plugins do: containerd serves them on its
// [metrics] address (/v1/metrics), containerd-fuse-overlayfs-grpc on
// --metrics-address. README, "Metrics", says what each means.
var (
	// deadMountsFound counts fuse-overlayfs mounts found without their
	// server: when="open" by the recovery at open, when="running" by the
	// watcher while the snapshotter runs.
	deadMountsFound metrics.LabeledCounter
	// recoveredDirs counts directories the recovery at open removed:
	// kind="probe" (leftover probe directories), kind="orphan" (snapshot
	// directories the metadata store does not know).
	recoveredDirs metrics.LabeledCounter
)

// sampleInterval bounds how often a scrape walks the metadata store and
// reads /proc: scrapes in between get the last sample.
const sampleInterval = 10 * time.Second

var ns = metrics.NewNamespace("containerd", "fuse_overlayfs", nil)

func init() {
	deadMountsFound = ns.NewLabeledCounter("dead_mounts_found", "fuse-overlayfs mounts found whose server had died, by when they were found (open: recovery when the snapshotter opened its root; running: the watcher)", "when")
	recoveredDirs = ns.NewLabeledCounter("recovered_directories", "directories removed by the recovery when the snapshotter opened its root, by kind (probe, orphan)", "kind")
	for _, w := range []string{"open", "running"} {
		deadMountsFound.WithValues(w).Inc(0)
	}
	for _, k := range []string{"probe", "orphan"} {
		recoveredDirs.WithValues(k).Inc(0)
	}
	ns.Add(&sampler)
	metrics.Register(ns)
}

var (
	descSnapshots = ns.NewDesc("snapshots", "snapshots in the metadata store, by kind (active, view, committed)", metrics.Unit(""), "kind")
	descBytes     = ns.NewDesc("committed_layers", "disk space of the committed layers, as measured at commit", metrics.Bytes)
	descInodes    = ns.NewDesc("committed_layers_inodes", "inodes of the committed layers, as counted at commit", metrics.Unit(""))
	descMounts    = ns.NewDesc("mounts", "fuse-overlayfs mounts of the snapshotter's layers, by state (live: served; dead: the server died, every access fails with ENOTCONN)", metrics.Unit(""), "state")
	descServers   = ns.NewDesc("servers", "fuse-overlayfs server processes serving the snapshotter's mounts", metrics.Unit(""))
	descRSS       = ns.NewDesc("servers_resident_memory", "resident memory of all fuse-overlayfs servers together", metrics.Bytes)
	descFDs       = ns.NewDesc("servers_open_fds", "open file descriptors of all fuse-overlayfs servers together", metrics.Unit(""))
)

// open lists the snapshotters of this process, which the sampler sums.
var open = struct {
	sync.Mutex
	set map[*snapshotter]struct{}
}{set: map[*snapshotter]struct{}{}}

func registerOpen(o *snapshotter) {
	open.Lock()
	open.set[o] = struct{}{}
	open.Unlock()
}

func unregisterOpen(o *snapshotter) {
	open.Lock()
	delete(open.set, o)
	open.Unlock()
}

// sample is what one sampling found.
type sample struct {
	kinds             map[string]float64
	bytes, inodes     float64
	live, dead        float64
	servers, rss, fds float64
}

// metricsSampler is a prometheus.Collector that samples at most every
// sampleInterval.
type metricsSampler struct {
	mu   sync.Mutex
	at   time.Time
	last sample
}

var sampler metricsSampler

func (s *metricsSampler) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descSnapshots, descBytes, descInodes, descMounts, descServers, descRSS, descFDs} {
		ch <- d
	}
}

func (s *metricsSampler) Collect(ch chan<- prometheus.Metric) {
	s.mu.Lock()
	if time.Since(s.at) >= sampleInterval {
		s.last = takeSample()
		s.at = time.Now()
	}
	v := s.last
	s.mu.Unlock()
	for _, k := range []string{"active", "view", "committed"} {
		ch <- prometheus.MustNewConstMetric(descSnapshots, prometheus.GaugeValue, v.kinds[k], k)
	}
	ch <- prometheus.MustNewConstMetric(descBytes, prometheus.GaugeValue, v.bytes)
	ch <- prometheus.MustNewConstMetric(descInodes, prometheus.GaugeValue, v.inodes)
	ch <- prometheus.MustNewConstMetric(descMounts, prometheus.GaugeValue, v.live, "live")
	ch <- prometheus.MustNewConstMetric(descMounts, prometheus.GaugeValue, v.dead, "dead")
	ch <- prometheus.MustNewConstMetric(descServers, prometheus.GaugeValue, v.servers)
	ch <- prometheus.MustNewConstMetric(descRSS, prometheus.GaugeValue, v.rss)
	ch <- prometheus.MustNewConstMetric(descFDs, prometheus.GaugeValue, v.fds)
}

// takeSample walks the metadata store of every open snapshotter (one read
// transaction each) and reads the status of the servers its watcher
// tracks: no scan of /proc, no access to the mounts.
func takeSample() sample {
	v := sample{kinds: map[string]float64{}}
	open.Lock()
	sns := make([]*snapshotter, 0, len(open.set))
	for o := range open.set {
		sns = append(sns, o)
	}
	open.Unlock()
	for _, o := range sns {
		_ = o.ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
			if _, err := storage.IDMap(ctx); errdefs.IsNotFound(err) {
				return nil
			}
			return storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
				v.kinds[strings.ToLower(info.Kind.String())]++
				if info.Kind == snapshots.KindCommitted {
					if _, _, u, err := storage.GetInfo(ctx, info.Name); err == nil {
						v.bytes += float64(u.Size)
						v.inodes += float64(u.Inodes)
					}
				}
				return nil
			})
		})
		if o.watch != nil {
			st := o.watch.stats()
			v.live += st.live
			v.dead += st.dead
			v.servers += st.servers
			v.rss += st.rss
			v.fds += st.fds
		}
	}
	return v
}
