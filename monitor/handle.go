package monitor

import (
	"context"

	"github.com/containerd/log"
)

// Handle is an open snapshotter under watch.
type Handle struct {
	src   Source
	watch *watcher // nil when the watcher could not start
}

// Start watches the servers of src's mounts and adds src to what the
// metrics sum, until Close. A watcher that cannot start is logged: the
// snapshotter works without it, but a server that dies is not reported.
func Start(src Source) *Handle {
	h := &Handle{src: src}
	w, err := startWatcher(src)
	if err != nil {
		log.L.WithError(err).Warn("cannot watch fuse-overlayfs servers: a server that dies will not be reported")
	} else {
		h.watch = w
	}
	open.Lock()
	open.set[h] = struct{}{}
	open.Unlock()
	return h
}

// Close stops the watcher and removes the snapshotter from the metrics.
func (h *Handle) Close() {
	open.Lock()
	delete(open.set, h)
	open.Unlock()
	if h.watch != nil {
		h.watch.stop()
		h.watch = nil
	}
}

// sample reads the census and the watcher's view.
func (h *Handle) sample() sample {
	var v sample
	if h.src.Census != nil {
		v.Census = h.src.Census(context.Background())
	}
	if h.watch != nil {
		st := h.watch.stats()
		v.live, v.dead, v.servers, v.rss, v.fds = st.live, st.dead, st.servers, st.rss, st.fds
	}
	return v
}
