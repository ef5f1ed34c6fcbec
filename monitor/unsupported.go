//go:build !linux

package monitor

import (
	"errors"
	"runtime"
)

// watcher does not exist on this system: the snapshotter runs on Linux only.
type watcher struct{}

type watchStats struct{ live, dead, servers, rss, fds float64 }

func startWatcher(Source) (*watcher, error) {
	return nil, errors.New("no watcher on " + runtime.GOOS)
}

func (*watcher) stop()             {}
func (*watcher) stats() watchStats { return watchStats{} }
