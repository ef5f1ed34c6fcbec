// Package monitor watches the fuse-overlayfs servers of open snapshotters
// (a server that dies under a mounted snapshot is logged and counted) and
// serves what it sees, with the snapshotters' own counts, as Prometheus
// metrics. Importing it registers nothing: the containerd plugin and
// containerd-fuse-overlayfs-grpc call Register. docs/operating.md says what
// each metric means.
package monitor

import (
	"context"
	"sync"
	"time"

	"github.com/docker/go-metrics"
	"github.com/prometheus/client_golang/prometheus"
)

// Census is what a snapshotter's metadata store holds, as the sampler
// reports it.
type Census struct {
	// Kinds counts snapshots by kind: "active", "view", "committed".
	Kinds map[string]float64
	// Bytes and Inodes sum the usage of the committed layers, as recorded
	// at commit.
	Bytes, Inodes float64
}

// Source is an open snapshotter, as the monitor sees it.
type Source struct {
	// Root is the snapshotter's root directory: servers whose layers are
	// in it are watched.
	Root string
	// KeyOf returns the key of the snapshot with ID id, or "" when unknown;
	// the watcher names it in its log.
	KeyOf func(id string) string
	// Census reads the metadata store; the sampler calls it at most once
	// per sampleInterval.
	Census func(ctx context.Context) Census
}

// The reasons and kinds the counters are labelled with.
const (
	FoundAtOpen     = "open"    // dead mount found by the recovery at open
	FoundRunning    = "running" // dead mount found by the watcher
	RecoveredProbe  = "probe"   // leftover host-check probe directory removed
	RecoveredOrphan = "orphan"  // snapshot directory the store does not know removed
)

// sampleInterval bounds how often a scrape walks the metadata stores and
// reads /proc: scrapes in between get the last sample.
const sampleInterval = 10 * time.Second

var (
	ns = metrics.NewNamespace("containerd", "fuse_overlayfs", nil)

	// deadMountsFound counts fuse-overlayfs mounts found without their
	// server, by when they were found.
	deadMountsFound = ns.NewLabeledCounter("dead_mounts_found", "fuse-overlayfs mounts found whose server had died, by when they were found (open: recovery when the snapshotter opened its root; running: the watcher)", "when")
	// recoveredDirs counts directories the recovery at open removed.
	recoveredDirs = ns.NewLabeledCounter("recovered_directories", "directories removed by the recovery when the snapshotter opened its root, by kind (probe, orphan)", "kind")

	descSnapshots = ns.NewDesc("snapshots", "snapshots in the metadata store, by kind (active, view, committed)", metrics.Unit(""), "kind")
	descBytes     = ns.NewDesc("committed_layers", "disk space of the committed layers, as measured at commit", metrics.Bytes)
	descInodes    = ns.NewDesc("committed_layers_inodes", "inodes of the committed layers, as counted at commit", metrics.Unit(""))
	descMounts    = ns.NewDesc("mounts", "fuse-overlayfs mounts of the snapshotter's layers in this mount namespace, by state (live: in the mount table and served; dead: the server died, every access fails with ENOTCONN)", metrics.Unit(""), "state")
	descServers   = ns.NewDesc("servers", "fuse-overlayfs server processes serving the snapshotter's layers", metrics.Unit(""))
	descRSS       = ns.NewDesc("servers_resident_memory", "resident memory of all fuse-overlayfs servers together", metrics.Bytes)
	descFDs       = ns.NewDesc("servers_open_fds", "open file descriptors of all fuse-overlayfs servers together", metrics.Unit(""))
)

var registerOnce sync.Once

// Register adds the metrics to the default Prometheus registry, which
// containerd serves on its [metrics] address (/v1/metrics) and
// containerd-fuse-overlayfs-grpc on --metrics-address. Calling it again does
// nothing.
func Register() {
	registerOnce.Do(func() {
		for _, w := range []string{FoundAtOpen, FoundRunning} {
			deadMountsFound.WithValues(w).Inc(0)
		}
		for _, k := range []string{RecoveredProbe, RecoveredOrphan} {
			recoveredDirs.WithValues(k).Inc(0)
		}
		ns.Add(&theSampler)
		metrics.Register(ns)
	})
}

// DeadMountFound counts a dead mount found at open (FoundAtOpen) or while
// running (FoundRunning).
func DeadMountFound(when string) { deadMountsFound.WithValues(when).Inc() }

// DirRecovered counts a directory the recovery at open removed, of kind
// RecoveredProbe or RecoveredOrphan.
func DirRecovered(kind string) { recoveredDirs.WithValues(kind).Inc() }

// sample is what one sampling found.
type sample struct {
	Census
	live, dead        float64
	servers, rss, fds float64
}

func (v *sample) add(o sample) {
	for k, n := range o.Kinds {
		v.Kinds[k] += n
	}
	v.Bytes += o.Bytes
	v.Inodes += o.Inodes
	v.live += o.live
	v.dead += o.dead
	v.servers += o.servers
	v.rss += o.rss
	v.fds += o.fds
}

// open is the set of handles of this process, which the sampler sums.
var open = struct {
	sync.Mutex
	set map[*Handle]struct{}
}{set: map[*Handle]struct{}{}}

// sampler is a prometheus.Collector that samples at most every
// sampleInterval.
type sampler struct {
	mu   sync.Mutex
	at   time.Time
	last sample
}

var theSampler sampler

func (s *sampler) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descSnapshots, descBytes, descInodes, descMounts, descServers, descRSS, descFDs} {
		ch <- d
	}
}

func (s *sampler) Collect(ch chan<- prometheus.Metric) {
	s.mu.Lock()
	if time.Since(s.at) >= sampleInterval {
		s.last = takeSample()
		s.at = time.Now()
	}
	v := s.last
	s.mu.Unlock()
	for _, k := range []string{"active", "view", "committed"} {
		ch <- prometheus.MustNewConstMetric(descSnapshots, prometheus.GaugeValue, v.Kinds[k], k)
	}
	ch <- prometheus.MustNewConstMetric(descBytes, prometheus.GaugeValue, v.Bytes)
	ch <- prometheus.MustNewConstMetric(descInodes, prometheus.GaugeValue, v.Inodes)
	ch <- prometheus.MustNewConstMetric(descMounts, prometheus.GaugeValue, v.live, "live")
	ch <- prometheus.MustNewConstMetric(descMounts, prometheus.GaugeValue, v.dead, "dead")
	ch <- prometheus.MustNewConstMetric(descServers, prometheus.GaugeValue, v.servers)
	ch <- prometheus.MustNewConstMetric(descRSS, prometheus.GaugeValue, v.rss)
	ch <- prometheus.MustNewConstMetric(descFDs, prometheus.GaugeValue, v.fds)
}

// takeSample sums the census and the watcher's view of every open handle.
func takeSample() sample {
	v := sample{Census: Census{Kinds: map[string]float64{}}}
	open.Lock()
	hs := make([]*Handle, 0, len(open.set))
	for h := range open.set {
		hs = append(hs, h)
	}
	open.Unlock()
	for _, h := range hs {
		v.add(h.sample())
	}
	return v
}
