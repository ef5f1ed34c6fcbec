package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/moby/sys/userns"
	"golang.org/x/sys/unix"
)

// sunPathMax is the size of sockaddr_un's sun_path on Linux.
const sunPathMax = 108

// maxSymlinks is how many symbolic links the walk follows, as the kernel's
// own path resolution (MAXSYMLINKS).
const maxSymlinks = 40

// socketHint is the fix offered for a socket directory that is refused.
const socketHint = "put the socket in a directory of its own (it is created with mode 0700), e.g. $XDG_RUNTIME_DIR/containerd-fuse-overlayfs/grpc.sock"

// listenHook, when set (by tests only), is called at each step of listen
// after the socket directory was checked ("checked") and after the socket
// was bound ("bound"), so that a test can change the tree in between.
var listenHook func(step string)

func hook(step string) {
	if listenHook != nil {
		listenHook(step)
	}
}

// listen creates the socket with mode 0600 in a directory of mode 0700
// owned by the server's user, whose ancestors only root or that user can
// change (see walkSocketDir), replacing a stale socket left by a server
// that died, but never one that a live server answers on, nor a file that
// is not a socket. Everything after the walk works on the directory's
// handle: the socket is bound in the directory that was checked, and the
// path clients dial is checked to lead to it.
func listen(path string) (net.Listener, error) {
	if len(path) > sunPathMax {
		return nil, fmt.Errorf("socket path %s is %d bytes, more than a unix socket address holds (%d): choose a shorter one: %w", path, len(path), sunPathMax, errdefs.ErrInvalidArgument)
	}
	dir, base := filepath.Split(path)
	if base == "" || base == "." || base == ".." || !filepath.IsAbs(path) {
		return nil, fmt.Errorf("socket path %q: want an absolute path ending in a file name: %w", path, errdefs.ErrInvalidArgument)
	}
	d, err := walkSocketDir(filepath.Clean(dir))
	if err != nil {
		return nil, err
	}
	l, err := listenIn(d, base, path)
	if err != nil {
		_ = d.Close()
		return nil, err
	}
	return l, nil
}

// listenIn binds the socket base in the checked directory d and returns
// a listener that owns d.
func listenIn(d *os.File, base, path string) (net.Listener, error) {
	hook("checked")
	if err := removeStale(d, base, path); err != nil {
		return nil, err
	}
	ul, err := bindAt(d, base, path)
	if err != nil {
		return nil, err
	}
	l := &dirListener{UnixListener: ul, dir: d, name: base, path: path}
	hook("bound")
	if err := l.verify(); err != nil {
		_ = l.Close()
		return nil, err
	}
	return l, nil
}

// procPath names base inside the directory open as d through /proc: a
// unix socket can only be bound or dialled by name, and this name leads to
// the directory held, whatever happens to its path.
func procPath(d *os.File, base string) (string, error) {
	p := fmt.Sprintf("/proc/self/fd/%d/%s", d.Fd(), base)
	if len(p) > sunPathMax {
		return "", fmt.Errorf("socket name %q is too long to be bound through %s (%d bytes, a unix socket address holds %d): choose a shorter name: %w", base, p, len(p), sunPathMax, errdefs.ErrInvalidArgument)
	}
	return p, nil
}

// bindAt binds a unix socket named base in d, with mode 0600 from the
// moment it exists.
func bindAt(d *os.File, base, path string) (*net.UnixListener, error) {
	p, err := procPath(d, base)
	if err != nil {
		return nil, err
	}
	old := unix.Umask(0o177)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: p, Net: "unix"})
	unix.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	// Unlinking by the /proc name after d is closed would name another
	// directory, or none: dirListener.Close unlinks relative to d.
	l.SetUnlinkOnClose(false)
	return l, nil
}

// dirListener is the socket bound in its checked directory, held open
// until Close, which removes the socket it bound and nothing else.
type dirListener struct {
	*net.UnixListener
	dir        *os.File
	name, path string
	dev, ino   uint64
	once       sync.Once
	err        error
}

// Addr is the path clients dial, not the /proc name the socket was bound
// through.
func (l *dirListener) Addr() net.Addr { return &net.UnixAddr{Name: l.path, Net: "unix"} }

// verify checks that the socket bound is a socket of mode 0600 and that
// the path clients dial leads to it, not to one someone put there by
// renaming a directory on the path after the walk.
func (l *dirListener) verify() error {
	var st unix.Stat_t
	if err := unix.Fstatat(int(l.dir.Fd()), l.name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("stat the socket %s after bind: %w", l.path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK || st.Mode&0o7777 != 0o600 {
		return fmt.Errorf("socket %s has mode %#o after bind, want a socket of mode 0600: %w", l.path, st.Mode, errdefs.ErrFailedPrecondition)
	}
	l.dev, l.ino = st.Dev, st.Ino
	var byPath unix.Stat_t
	if err := unix.Lstat(l.path, &byPath); err != nil {
		return fmt.Errorf("%w (%w)", l.replaced(), err)
	}
	if byPath.Dev != st.Dev || byPath.Ino != st.Ino {
		return l.replaced()
	}
	return nil
}

// replaced is verify's error for a socket path that no longer leads to the
// socket bound.
func (l *dirListener) replaced() error {
	return fmt.Errorf("socket path %s does not lead to the socket bound in the checked directory: a directory on the path was replaced while the server started; check who can write to its parents: %w", l.path, errdefs.ErrFailedPrecondition)
}

// Close stops listening and removes the socket if its name in the held
// directory is still the socket bound.
func (l *dirListener) Close() error {
	l.once.Do(func() {
		l.err = l.UnixListener.Close()
		var st unix.Stat_t
		fd := int(l.dir.Fd())
		if l.ino != 0 && unix.Fstatat(fd, l.name, &st, unix.AT_SYMLINK_NOFOLLOW) == nil && st.Dev == l.dev && st.Ino == l.ino {
			if err := unix.Unlinkat(fd, l.name, 0); err != nil && l.err == nil {
				l.err = fmt.Errorf("remove the socket %s: %w", l.path, err)
			}
		}
		_ = l.dir.Close()
	})
	return l.err
}

// removeStale removes the socket base in d if no server answers on it.
func removeStale(d *os.File, base, path string) error {
	fd := int(d.Fd())
	var st unix.Stat_t
	err := unix.Fstatat(fd, base, &st, unix.AT_SYMLINK_NOFOLLOW)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("stat %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return fmt.Errorf("%s exists and is not a socket (mode %#o): not removing it: %w", path, st.Mode, errdefs.ErrAlreadyExists)
	}
	p, err := procPath(d, base)
	if err != nil {
		return err
	}
	c, err := net.DialTimeout("unix", p, 2*time.Second)
	if err == nil {
		_ = c.Close()
		return fmt.Errorf("another server is listening on %s: %w", path, errdefs.ErrAlreadyExists)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("cannot tell whether the socket %s is in use: %w", path, err)
	}
	if err := unix.Unlinkat(fd, base, 0); err != nil {
		return fmt.Errorf("remove the stale socket %s: %w", path, err)
	}
	log.L.WithField("socket", path).Info("removed a stale socket")
	return nil
}

// owners are the users a directory on the socket's path may belong to.
type owners struct {
	euid uint32
	// overflow is the uid the kernel shows for an owner outside this user
	// namespace (host root among them), valid when inUserNS.
	overflow uint32
	inUserNS bool
}

func currentOwners() owners {
	o := owners{euid: uint32(os.Geteuid()), inUserNS: userns.RunningInUserNS()}
	o.overflow = 65534
	if b, err := os.ReadFile("/proc/sys/kernel/overflowuid"); err == nil {
		var n uint32
		if _, err := fmt.Sscan(strings.TrimSpace(string(b)), &n); err == nil {
			o.overflow = n
		}
	}
	return o
}

// trusted tells whether uid may own an ancestor: root or the server's
// user. Inside a user namespace (rootless, RootlessKit) the host's root
// shows as the overflow uid, like any other user outside the namespace's
// map; it is trusted there, since it cannot be told apart from host root
// and `/` itself shows so.
func (o owners) trusted(uid uint32) bool {
	return uid == 0 || uid == o.euid || (o.inUserNS && uid == o.overflow)
}

// walkSocketDir opens the socket directory dir (absolute, clean) one
// component at a time from `/`, each relative to the handle of the one
// before (O_PATH|O_NOFOLLOW), creating missing ones with mode 0700, and
// checks each on its handle as a setuid program would: every ancestor must
// be owned by root or the server's user and not writable by group or
// others unless sticky (a sticky directory's entry must then itself be
// owned by root or the server's user, which the same check on the next
// component gives). A symbolic link among the ancestors (/var/run -> /run)
// is followed when owned by root or the server's user, since its directory
// was checked; its target is walked and checked the same way. The socket
// directory itself must not be a link, must be owned by the server's user
// and have mode 0700. It returns the directory's handle.
func walkSocketDir(dir string) (*os.File, error) {
	w := walker{owners: currentOwners(), want: dir}
	return w.walk()
}

// walker is one walk of walkSocketDir.
type walker struct {
	owners owners
	want   string
	// fd and at are the directory reached and its path.
	fd    int
	at    string
	links int
}

func (w *walker) walk() (*os.File, error) {
	fd, err := unix.Open("/", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open /: %w", err)
	}
	w.fd, w.at = fd, "/"
	queue := components(w.want)
	if err := w.checkDir(len(queue) == 0); err != nil {
		_ = unix.Close(w.fd)
		return nil, err
	}
	for len(queue) > 0 {
		c := queue[0]
		queue = queue[1:]
		more, err := w.step(c, len(queue) == 0)
		if err != nil {
			_ = unix.Close(w.fd)
			return nil, err
		}
		queue = append(more, queue...)
	}
	return os.NewFile(uintptr(w.fd), w.want), nil
}

// components splits a path into its names, leaving out empty ones and ".".
func components(p string) []string {
	var out []string
	for _, c := range strings.Split(p, "/") {
		if c != "" && c != "." {
			out = append(out, c)
		}
	}
	return out
}

// step moves the walk into the entry c of the current directory; last
// tells that c is the socket directory. For a symbolic link it returns the
// components of its target, to walk before the rest.
func (w *walker) step(c string, last bool) ([]string, error) {
	next := filepath.Join(w.at, c)
	nfd, err := w.openOrCreate(c, next)
	if err != nil {
		return nil, err
	}
	var st unix.Stat_t
	if err := unix.Fstat(nfd, &st); err != nil {
		_ = unix.Close(nfd)
		return nil, fmt.Errorf("stat %s: %w", next, err)
	}
	if st.Mode&unix.S_IFMT == unix.S_IFLNK {
		defer func() { _ = unix.Close(nfd) }()
		return w.follow(nfd, &st, next, last)
	}
	_ = unix.Close(w.fd)
	w.fd, w.at = nfd, next
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		if last {
			return nil, fmt.Errorf("socket directory %s is not a directory (mode %#o): %w", next, st.Mode, errdefs.ErrInvalidArgument)
		}
		return nil, fmt.Errorf("socket path ancestor %s is not a directory (mode %#o): %w", next, st.Mode, errdefs.ErrInvalidArgument)
	}
	return nil, w.checkDir(last)
}

// openOrCreate opens the entry c of the current directory without
// following it, creating it as a directory of mode 0700 if it is missing.
func (w *walker) openOrCreate(c, next string) (int, error) {
	const flags = unix.O_PATH | unix.O_NOFOLLOW | unix.O_CLOEXEC
	nfd, err := unix.Openat(w.fd, c, flags, 0)
	if errors.Is(err, unix.ENOENT) {
		if err := unix.Mkdirat(w.fd, c, 0o700); err != nil && !errors.Is(err, unix.EEXIST) {
			return -1, fmt.Errorf("create the socket directory %s: %w", next, err)
		}
		nfd, err = unix.Openat(w.fd, c, flags, 0)
	}
	if err != nil {
		return -1, fmt.Errorf("open %s: %w", next, err)
	}
	return nfd, nil
}

// follow checks the symbolic link open as nfd at path next and returns
// the components of its target; an absolute target restarts the walk at
// `/`.
func (w *walker) follow(nfd int, st *unix.Stat_t, next string, last bool) ([]string, error) {
	target, err := readlinkFd(nfd)
	if err != nil {
		return nil, fmt.Errorf("read the symbolic link %s: %w", next, err)
	}
	if last {
		return nil, fmt.Errorf("socket directory %s is a symbolic link (to %q), want a directory: give the directory's own path, or %s: %w", next, target, socketHint, errdefs.ErrInvalidArgument)
	}
	if !w.owners.trusted(st.Uid) {
		return nil, fmt.Errorf("socket path ancestor %s is a symbolic link (to %q) owned by uid %d, want root or uid %d (whoever owns it decides where the socket goes): use a path without it, or %s: %w",
			next, target, st.Uid, w.owners.euid, socketHint, errdefs.ErrFailedPrecondition)
	}
	if w.links++; w.links > maxSymlinks {
		return nil, fmt.Errorf("socket path %s: more than %d symbolic links: %w", w.want, maxSymlinks, errdefs.ErrInvalidArgument)
	}
	more := components(target)
	if filepath.IsAbs(target) {
		fd, err := unix.Open("/", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, fmt.Errorf("open /: %w", err)
		}
		_ = unix.Close(w.fd)
		w.fd, w.at = fd, "/"
		if err := w.checkDir(false); err != nil {
			return nil, err
		}
	}
	return more, nil
}

// readlinkFd reads the target of the symbolic link open (O_PATH) as fd.
func readlinkFd(fd int) (string, error) {
	buf := make([]byte, unix.PathMax)
	n, err := unix.Readlinkat(fd, "", buf)
	if err != nil {
		return "", err
	}
	return string(buf[:n]), nil
}

// checkDir checks the directory the walk is at: as an ancestor, or as the
// socket directory when last.
func (w *walker) checkDir(last bool) error {
	var st unix.Stat_t
	if err := unix.Fstat(w.fd, &st); err != nil {
		return fmt.Errorf("stat %s: %w", w.at, err)
	}
	if last {
		return checkSocketDir(w.at, &st, w.owners.euid)
	}
	return checkAncestor(w.at, &st, w.owners)
}

// checkAncestor refuses a directory above the socket that someone other
// than root or the server's user could change: whoever can rename its
// entries can put another directory, and another socket, on the path.
func checkAncestor(p string, st *unix.Stat_t, o owners) error {
	mode := st.Mode & 0o7777
	if !o.trusted(st.Uid) {
		return fmt.Errorf("socket path ancestor %s is owned by uid %d (mode %04o), want root or uid %d (the server's): its owner can replace the socket directory; use a path whose directories belong to root or to you, or %s: %w",
			p, st.Uid, mode, o.euid, socketHint, errdefs.ErrFailedPrecondition)
	}
	if mode&0o022 != 0 && mode&unix.S_ISVTX == 0 {
		return fmt.Errorf("socket path ancestor %s (owner uid %d) has mode %04o: writable by group or others without the sticky bit, anyone who can write there can rename the socket directory away and put theirs in its place; run chmod go-w %s (or chmod +t), or %s: %w",
			p, st.Uid, mode, p, socketHint, errdefs.ErrFailedPrecondition)
	}
	return nil
}

// checkSocketDir refuses a socket directory that anyone but the server's
// user could reach or change: owned by the effective uid (its owner may
// change its mode, and replace or connect to the socket), with mode 0700.
func checkSocketDir(dir string, st *unix.Stat_t, euid uint32) error {
	if st.Uid != euid {
		return fmt.Errorf("socket directory %s is owned by uid %d, want %d (the server's effective uid) so that no other user can reach or replace the socket: %s: %w", dir, st.Uid, euid, socketHint, errdefs.ErrInvalidArgument)
	}
	if perm := st.Mode & 0o7777; perm != 0o700 {
		return fmt.Errorf("socket directory %s has mode %04o, want 0700 so that only its owner can reach the socket: %s: %w", dir, perm, socketHint, errdefs.ErrInvalidArgument)
	}
	return nil
}
