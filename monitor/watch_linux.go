//go:build linux

package monitor

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/fosnap/fuseoverlayfs/internal/layout"
)

// watcher notices fuse-overlayfs servers of this snapshotter's mounts that
// die while their mount is still in use (a container's rootfs), logs the
// mount and the snapshot key, and counts it. Its cost does not grow with
// the number of containers per unit of time: one goroutine waits in epoll on
// the mount table (/proc/self/mountinfo signals every change) and on one
// pidfd per server (readable when the process exits). /proc is scanned for
// new servers only after the mount table changed.
type watcher struct {
	src  Source
	root layout.Root
	ep   int
	mi   int // /proc/self/mountinfo, a raw descriptor: Go's poller must not consume its events
	wake [2]int

	mu      sync.Mutex
	servers map[int]*server // by pidfd
	dead    map[string]bool // mount points found dead that could not be detached
	done    chan struct{}
}

// server is a fuse-overlayfs process serving one of this root's mounts.
type server struct {
	pid        int
	mountpoint string
	id         string // snapshot ID of its upper (or first lower) directory
}

// watchStats is what the sampler reads.
type watchStats struct{ live, dead, servers, rss, fds float64 }

// rescanDelays: after a change of the mount table, /proc is scanned at once
// and again later, since fuse-overlayfs forks its server after mounting.
var rescanDelays = []time.Duration{200 * time.Millisecond, time.Second, 3 * time.Second}

func startWatcher(src Source) (*watcher, error) {
	ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, err
	}
	w := &watcher{src: src, root: layout.Root(src.Root), ep: ep, mi: -1, servers: map[int]*server{}, dead: map[string]bool{}, done: make(chan struct{})}
	fail := func(err error) (*watcher, error) {
		w.closeFDs()
		return nil, err
	}
	if w.mi, err = unix.Open("/proc/self/mountinfo", unix.O_RDONLY|unix.O_CLOEXEC, 0); err != nil {
		w.mi = -1
		return fail(err)
	}
	if err := unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, w.mi, &unix.EpollEvent{Events: unix.EPOLLPRI | unix.EPOLLERR, Fd: int32(w.mi)}); err != nil {
		return fail(err)
	}
	if err := unix.Pipe2(w.wake[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return fail(err)
	}
	if err := unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, w.wake[0], &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(w.wake[0])}); err != nil {
		return fail(err)
	}
	w.scan()
	go w.loop()
	return w, nil
}

func (w *watcher) closeFDs() {
	for fd := range w.servers {
		_ = unix.Close(fd)
	}
	if w.mi >= 0 {
		_ = unix.Close(w.mi)
	}
	for _, fd := range w.wake {
		if fd > 0 {
			_ = unix.Close(fd)
		}
	}
	_ = unix.Close(w.ep)
}

// stop ends the watcher and waits for it.
func (w *watcher) stop() {
	_, _ = unix.Write(w.wake[1], []byte{0})
	<-w.done
	w.closeFDs()
}

func (w *watcher) loop() {
	defer close(w.done)
	events := make([]unix.EpollEvent, 16)
	var rescans []time.Time
	for {
		timeout := -1
		if len(rescans) > 0 {
			timeout = max(0, int(time.Until(rescans[0]).Milliseconds()))
		}
		n, err := unix.EpollWait(w.ep, events, timeout)
		if err != nil && !errors.Is(err, unix.EINTR) {
			log.L.WithError(err).Warn("fuse-overlayfs mount watcher stopped")
			return
		}
		for _, ev := range events[:max(n, 0)] {
			switch int(ev.Fd) {
			case w.wake[0]:
				return
			case w.mi:
				rescans = schedule(rescans, time.Now(), rescanDelays)
				w.pruneDead()
			default:
				if w.exited(int(ev.Fd)) {
					// A live mount whose watched process exited: that was
					// fuse-overlayfs' parent, which exits once its daemon
					// child serves. Look for the child.
					rescans = schedule(rescans, time.Now(), rescanDelays[:2])
				}
			}
		}
		if len(rescans) > 0 && !time.Now().Before(rescans[0]) {
			rescans = rescans[1:]
			w.scan()
		}
	}
}

// schedule adds scans at now+each delay to the pending ones (sorted), but
// never moves a pending scan later: a host whose mount table changes all the
// time must not starve the scan. Scans closer than the first delay to each
// other are merged, so a busy mount table costs at most one scan per delay.
func schedule(pending []time.Time, now time.Time, delays []time.Duration) []time.Time {
	for _, d := range delays {
		at := now.Add(d)
		i := sort.Search(len(pending), func(i int) bool { return !pending[i].Before(at) })
		near := func(j int) bool {
			return j >= 0 && j < len(pending) && pending[j].Sub(at).Abs() < rescanDelays[0]
		}
		if near(i) || near(i-1) {
			continue
		}
		pending = slices.Insert(pending, i, at)
	}
	return pending
}

// scan finds fuse-overlayfs processes serving this root's layers that are
// not watched yet and opens a pidfd for each.
func (w *watcher) scan() {
	known := map[int]bool{}
	w.mu.Lock()
	for _, s := range w.servers {
		known[s.pid] = true
	}
	w.mu.Unlock()
	procs, _ := filepath.Glob("/proc/[0-9]*")
	for _, p := range procs {
		pid, err := strconv.Atoi(filepath.Base(p))
		if err != nil || known[pid] {
			continue
		}
		comm, err := os.ReadFile(p + "/comm")
		if err != nil || string(bytes.TrimSpace(comm)) != layout.ServerComm {
			continue
		}
		s, ok := w.parseServer(pid)
		if !ok {
			continue
		}
		fd, err := unix.PidfdOpen(pid, 0)
		if err != nil {
			continue // gone already, or no pidfd (Linux < 5.3)
		}
		if err := unix.EpollCtl(w.ep, unix.EPOLL_CTL_ADD, fd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(fd)}); err != nil {
			_ = unix.Close(fd)
			continue
		}
		w.mu.Lock()
		w.servers[fd] = s
		w.mu.Unlock()
	}
}

// parseServer reads a fuse-overlayfs command line (fuse-overlayfs [-f] -o
// OPTIONS MOUNTPOINT) and keeps it when its layers are in this root.
func (w *watcher) parseServer(pid int) (*server, bool) {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return nil, false
	}
	return w.parseCmdline(pid, strings.Split(strings.TrimRight(string(data), "\x00"), "\x00"))
}

// parseCmdline parses the arguments of the server pid.
func (w *watcher) parseCmdline(pid int, args []string) (*server, bool) {
	s := &server{pid: pid}
	// fuse-overlayfs [-f] -o OPTS MOUNTPOINT, or as mount.fuse3 runs it:
	// fuse-overlayfs SOURCE MOUNTPOINT -o OPTS.
	var positional, opts []string
	for i := 1; i < len(args); i++ {
		switch a := args[i]; {
		case a == "-o" && i+1 < len(args):
			opts = append(opts, args[i+1])
			i++
		case strings.HasPrefix(a, "-o"):
			opts = append(opts, a[2:])
		case strings.HasPrefix(a, "-"):
		default:
			positional = append(positional, a)
		}
	}
	if len(positional) == 0 {
		return nil, false
	}
	s.mountpoint = positional[len(positional)-1]
	for _, opt := range strings.Split(strings.Join(opts, ","), ",") {
		k, v, _ := strings.Cut(opt, "=")
		var dir string
		switch k {
		case "upperdir":
			dir = v
		case "lowerdir":
			if s.id == "" {
				dir, _, _ = strings.Cut(v, ":")
			}
		}
		if id, ok := w.root.LayerID(dir); ok {
			s.id = id
		}
	}
	return s, s.id != ""
}

// exited handles a server whose pidfd became readable: if its mount is
// still there, the mount is dead. It reports whether the mount is still
// there and alive.
func (w *watcher) exited(fd int) bool {
	_ = unix.EpollCtl(w.ep, unix.EPOLL_CTL_DEL, fd, nil)
	_ = unix.Close(fd)
	w.mu.Lock()
	s := w.servers[fd]
	delete(w.servers, fd)
	w.mu.Unlock()
	if s == nil || !isMounted(s.mountpoint) {
		return false // unmounted first, as on every normal stop
	}
	if !Disconnected(s.mountpoint) {
		return true
	}
	defer DeadMountFound(FoundRunning)
	fields := log.Fields{"mountpoint": s.mountpoint, "snapshot": w.keyOf(s.id), "snapshot-id": s.id, "pid": s.pid}
	// A mount without its server never serves again. Left in place it
	// also keeps the container from being stopped: once the kernel's
	// attribute cache expires, the shim's lstat of the rootfs before its
	// unmount fails with ENOTCONN, on every try. Detached, the mount point
	// is a plain directory again (processes inside keep the dead mount).
	if err := unix.Unmount(s.mountpoint, unix.MNT_DETACH); err != nil {
		w.mu.Lock()
		w.dead[s.mountpoint] = true
		w.mu.Unlock()
		fields["error"] = err
		log.L.WithFields(fields).Error("fuse-overlayfs server died under a mounted snapshot and its mount could not be detached: every access to it fails with ENOTCONN (transport endpoint is not connected); run `umount -l` on the mount point, then stop the container using it and start it again")
		return false
	}
	log.L.WithFields(fields).Error("fuse-overlayfs server died under a mounted snapshot: its mount was detached, the container on it sees ENOTCONN (transport endpoint is not connected) for every access; stop the container and start it again (containerd then mounts the snapshot anew)")
	return false
}

// keyOf returns the key of the snapshot with ID id, or "" when unknown.
func (w *watcher) keyOf(id string) string {
	if w.src.KeyOf == nil {
		return ""
	}
	return w.src.KeyOf(id)
}

// pruneDead forgets dead mounts that are no longer mounted.
func (w *watcher) pruneDead() {
	w.mu.Lock()
	defer w.mu.Unlock()
	for mp := range w.dead {
		if !isMounted(mp) {
			delete(w.dead, mp)
		}
	}
}

// stats reads the resident memory and open descriptors of the watched
// servers from /proc, and counts their mount points that the mount table
// lists (live unless found dead): a server whose mount was detached, or two
// processes of one mount, do not make a live mount.
func (w *watcher) stats() watchStats {
	w.mu.Lock()
	pids := make([]int, 0, len(w.servers))
	points := map[string]bool{}
	for _, s := range w.servers {
		pids = append(pids, s.pid)
		points[s.mountpoint] = true
	}
	st := watchStats{dead: float64(len(w.dead))}
	for mp := range w.dead {
		delete(points, mp)
	}
	w.mu.Unlock()
	st.live = float64(countMounted(points))
	for _, pid := range pids {
		if rss, fds, ok := processUsage(pid); ok {
			st.servers++
			st.rss += rss
			st.fds += fds
		}
	}
	return st
}

// processUsage reads the resident memory (bytes) and the number of open
// descriptors of process pid; ok is false when it is gone.
func processUsage(pid int) (rss, fds float64, ok bool) {
	p := "/proc/" + strconv.Itoa(pid)
	status, err := os.ReadFile(p + "/status")
	if err != nil {
		return 0, 0, false
	}
	for _, line := range strings.Split(string(status), "\n") {
		if v, found := strings.CutPrefix(line, "VmRSS:"); found {
			if f := strings.Fields(v); len(f) > 0 {
				if kb, err := strconv.ParseFloat(f[0], 64); err == nil {
					rss += kb * 1024
				}
			}
		}
	}
	if entries, err := os.ReadDir(p + "/fd"); err == nil {
		fds = float64(len(entries))
	}
	return rss, fds, true
}
