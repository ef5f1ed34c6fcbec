package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// otherUID owns the socket directories of another user in the tests.
const otherUID = 12345

// TestSocketDirChecks: listen refuses, as invalid arguments naming the
// directory and creating nothing, a socket directory that is a symbolic
// link (even to a good directory), one owned by another uid and one of
// another mode; it takes a 0700 directory of its own user.
func TestSocketDirChecks(t *testing.T) {
	dir := shortDir(t)
	mkdir := func(name string, mode os.FileMode) string {
		t.Helper()
		p := filepath.Join(dir, name)
		if err := os.Mkdir(p, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil { // whatever the umask
			t.Fatal(err)
		}
		return p
	}
	good := mkdir("good", 0o700)
	link := filepath.Join(dir, "link")
	if err := os.Symlink(good, link); err != nil {
		t.Fatal(err)
	}
	open := mkdir("open", 0o750)

	for _, tc := range []struct {
		name, dir, want string
		root            bool
	}{
		{name: "symlink to a good directory", dir: link, want: "socket directory " + link + " is a symbolic link"},
		{name: "open", dir: open, want: "socket directory " + open + " has mode 0750, want 0700"},
		{name: "other owner", dir: filepath.Join(dir, "theirs"), root: true,
			want: fmt.Sprintf("socket directory %s is owned by uid %d, want %d", filepath.Join(dir, "theirs"), otherUID, os.Geteuid())},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.root {
				testutil.RequireRoot(t)
				mkdir(filepath.Base(tc.dir), 0o700)
				if err := os.Chown(tc.dir, otherUID, otherUID); err != nil {
					t.Fatal(err)
				}
			}
			socket := filepath.Join(tc.dir, "s.sock")
			l, err := listen(socket)
			if err == nil {
				_ = l.Close()
				t.Fatalf("listen on %s succeeded, want %q", socket, tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) || !errdefs.IsInvalidArgument(err) {
				t.Errorf("error %v, want an invalid-argument error containing %q", err, tc.want)
			}
			if _, err := os.Lstat(socket); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("socket %s created although refused: %v", socket, err)
			}
		})
	}
	// Nothing went through the link into the good directory.
	if entries, err := os.ReadDir(good); err != nil || len(entries) != 0 {
		t.Errorf("%s after the refusals: %v, %v", good, entries, err)
	}

	t.Run("good", func(t *testing.T) {
		socket := filepath.Join(good, "s.sock")
		l, err := listen(socket)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = l.Close() }()
		if st, err := os.Lstat(socket); err != nil || st.Mode() != os.ModeSocket|0o600 {
			t.Errorf("socket %s: %v, %v", socket, st, err)
		}
	})
}

// TestSocketSafety: a stale socket is replaced; a live one, a file that is
// not a socket, a directory others can enter, one owned by another user and
// a symbolic link to a directory are refused.
func TestSocketSafety(t *testing.T) {
	testutil.RequireFUSE(t)
	dir := shortDir(t)
	root := filepath.Join(dir, "root")
	runDir := filepath.Join(dir, "run")
	if err := os.Mkdir(runDir, 0o700); err != nil {
		t.Fatal(err)
	}
	socket := filepath.Join(runDir, "fo.sock")

	t.Run("live", func(t *testing.T) {
		l, err := net.Listen("unix", socket)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = l.Close() }()
		code, out := runCommand(t, nil, socket, root)
		if code != exitFailure || !strings.Contains(out, "another server is listening on "+socket) {
			t.Errorf("exit %d, output %q", code, out)
		}
		if _, err := os.Lstat(socket); err != nil {
			t.Errorf("the live socket was removed: %v", err)
		}
	})

	t.Run("not a socket", func(t *testing.T) {
		other := filepath.Join(runDir, "file")
		if err := os.WriteFile(other, []byte("keep me"), 0o600); err != nil {
			t.Fatal(err)
		}
		code, out := runCommand(t, nil, other, root)
		if code != exitFailure || !strings.Contains(out, "exists and is not a socket") {
			t.Errorf("exit %d, output %q", code, out)
		}
		if got, err := os.ReadFile(other); err != nil || string(got) != "keep me" {
			t.Errorf("the file was touched: %q, %v", got, err)
		}
	})

	t.Run("open directory", func(t *testing.T) {
		open := filepath.Join(dir, "open")
		if err := os.Mkdir(open, 0o755); err != nil {
			t.Fatal(err)
		}
		code, out := runCommand(t, nil, filepath.Join(open, "fo.sock"), root)
		if code != exitFailure || !strings.Contains(out, "has mode 0755, want 0700") {
			t.Errorf("exit %d, output %q", code, out)
		}
	})

	t.Run("other owner", func(t *testing.T) {
		theirs := filepath.Join(dir, "theirs")
		if err := os.Mkdir(theirs, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(theirs, otherUID, otherUID); err != nil {
			t.Fatal(err)
		}
		code, out := runCommand(t, nil, filepath.Join(theirs, "fo.sock"), root)
		want := fmt.Sprintf("socket directory %s is owned by uid %d, want %d", theirs, otherUID, os.Geteuid())
		if code != exitFailure || !strings.Contains(out, want) {
			t.Errorf("exit %d, output %q; want exit %d and %q", code, out, exitFailure, want)
		}
		if _, err := os.Lstat(filepath.Join(theirs, "fo.sock")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("socket created in a directory of another user: %v", err)
		}
	})

	t.Run("symlink", func(t *testing.T) {
		target, link := filepath.Join(dir, "target"), filepath.Join(dir, "link")
		if err := os.Mkdir(target, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(target, link); err != nil {
			t.Fatal(err)
		}
		code, out := runCommand(t, nil, filepath.Join(link, "fo.sock"), root)
		want := "socket directory " + link + " is a symbolic link"
		if code != exitFailure || !strings.Contains(out, want) {
			t.Errorf("exit %d, output %q; want exit %d and %q", code, out, exitFailure, want)
		}
		if _, err := os.Lstat(filepath.Join(target, "fo.sock")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("socket created through the symlink: %v", err)
		}
	})

	t.Run("stale", func(t *testing.T) {
		// A socket whose server is gone: bound, never unlinked.
		l, err := net.ListenUnix("unix", &net.UnixAddr{Name: socket, Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		l.SetUnlinkOnClose(false)
		if err := l.Close(); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Lstat(socket); err != nil {
			t.Fatalf("stale socket not there: %v", err)
		}
		srv := start(t, nil, socket, root)
		srv.waitServing(socket)
		if !strings.Contains(srv.out.String(), "removed a stale socket") {
			t.Errorf("no message about the stale socket:\n%s", srv.out)
		}
		st, err := os.Lstat(socket)
		if err != nil || st.Mode() != os.ModeSocket|0o600 {
			t.Errorf("new socket: %v, %v", st, err)
		}
		// A second server on the same root is refused instead of hanging
		// on the metadata store's lock.
		code, out := runCommand(t, nil, filepath.Join(runDir, "second.sock"), root)
		if code != exitFailure || !strings.Contains(out, "is in use by another process") {
			t.Errorf("second server on the same root: exit %d, output %q", code, out)
		}
		if err := srv.proc.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		if code := srv.exitCode(); code != 0 {
			t.Errorf("exit %d after SIGTERM; output:\n%s", code, srv.out)
		}
	})
	testutil.RequireNoLeftovers(t, root)
}

// mkdirOwned makes dir with exactly mode (umask aside) and owner uid.
func mkdirOwned(t *testing.T, dir string, mode os.FileMode, uid int) {
	t.Helper()
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(dir, uid, uid); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, mode); err != nil {
		t.Fatal(err)
	}
}

// symlinkOwned makes a symbolic link owned by uid.
func symlinkOwned(t *testing.T, target, link string, uid int) {
	t.Helper()
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	if err := os.Lchown(link, uid, uid); err != nil {
		t.Fatal(err)
	}
}

// assertListens checks that a client dialling socket reaches l, and that
// Close removes the socket.
func assertListens(t *testing.T, l net.Listener, socket string) {
	t.Helper()
	c, err := net.Dial("unix", socket)
	if err != nil {
		t.Fatalf("dial %s: %v", socket, err)
	}
	defer func() { _ = c.Close() }()
	a, err := l.Accept()
	if err != nil {
		t.Fatalf("accept on the listener of %s: %v", socket, err)
	}
	_ = a.Close()
	if l.Addr().String() != socket {
		t.Errorf("listener address %s, want %s", l.Addr(), socket)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(socket); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket %s left after Close: %v", socket, err)
	}
}

// TestSocketAncestors: every directory above the socket directory must be
// owned by root or the server's user and not writable by group or others
// unless sticky; a symbolic link on the path is followed only when root or
// the server's user owns it, and its target is checked the same way. A
// refusal is a failed precondition naming the ancestor, its owner and
// mode, and creates nothing below it.
func TestSocketAncestors(t *testing.T) {
	testutil.RequireRoot(t)
	base := shortDir(t)
	at := func(p ...string) string { return filepath.Join(append([]string{base}, p...)...) }

	mkdirOwned(t, at("theirs-open"), 0o777, otherUID)
	mkdirOwned(t, at("root-open"), 0o777, 0)
	mkdirOwned(t, at("group"), 0o770, 0)
	mkdirOwned(t, at("theirs"), 0o755, otherUID)
	mkdirOwned(t, at("sticky"), 0o777|os.ModeSticky, 0)
	mkdirOwned(t, at("sticky", "mine"), 0o755, 0)
	mkdirOwned(t, at("sticky", "theirs"), 0o755, otherUID)
	mkdirOwned(t, at("good"), 0o755, 0)
	symlinkOwned(t, at("root-open"), at("link-to-open"), 0)
	symlinkOwned(t, "good", at("their-link"), otherUID)
	symlinkOwned(t, "good", at("root-link"), 0)
	symlinkOwned(t, at("sticky", "mine"), at("abs-link"), 0)

	for _, tc := range []struct {
		name, socket, want string
	}{
		{"others may write, another owner", at("theirs-open", "run", "s.sock"),
			fmt.Sprintf("socket path ancestor %s is owned by uid %d (mode 0777)", at("theirs-open"), otherUID)},
		{"others may write, root's", at("root-open", "run", "s.sock"),
			fmt.Sprintf("socket path ancestor %s (owner uid 0) has mode 0777", at("root-open"))},
		{"group may write", at("group", "run", "s.sock"), fmt.Sprintf("socket path ancestor %s (owner uid 0) has mode 0770", at("group"))},
		{"another owner, not writable", at("theirs", "run", "s.sock"), fmt.Sprintf("socket path ancestor %s is owned by uid %d (mode 0755)", at("theirs"), otherUID)},
		{"sticky, child of another owner", at("sticky", "theirs", "run", "s.sock"),
			fmt.Sprintf("socket path ancestor %s is owned by uid %d", at("sticky", "theirs"), otherUID)},
		{"link into an open directory", at("link-to-open", "run", "s.sock"), fmt.Sprintf("socket path ancestor %s (owner uid 0) has mode 0777", at("root-open"))},
		{"link of another owner", at("their-link", "run", "s.sock"),
			fmt.Sprintf("socket path ancestor %s is a symbolic link (to \"good\") owned by uid %d", at("their-link"), otherUID)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l, err := listen(tc.socket)
			if err == nil {
				_ = l.Close()
				t.Fatalf("listen on %s succeeded, want %q", tc.socket, tc.want)
			}
			if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "$XDG_RUNTIME_DIR") {
				t.Errorf("error %v, want a failed precondition containing %q and the fix", err, tc.want)
			}
			// Not created: neither the socket nor its directory.
			if _, err := os.Lstat(filepath.Dir(tc.socket)); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("%s created below a refused ancestor: %v", filepath.Dir(tc.socket), err)
			}
		})
	}
	for _, tc := range []struct{ name, socket, real string }{
		{"sticky, child of root", at("sticky", "mine", "run", "s.sock"), at("sticky", "mine", "run", "s.sock")},
		{"relative link of root", at("root-link", "run", "s.sock"), at("good", "run", "s.sock")},
		{"absolute link of root into a sticky directory", at("abs-link", "run2", "s.sock"), at("sticky", "mine", "run2", "s.sock")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l, err := listen(tc.socket)
			if err != nil {
				t.Fatal(err)
			}
			if st, err := os.Lstat(tc.real); err != nil || st.Mode() != os.ModeSocket|0o600 {
				t.Errorf("socket %s: %v, %v", tc.real, st, err)
			}
			if st, err := os.Lstat(filepath.Dir(tc.real)); err != nil || st.Mode() != os.ModeDir|0o700 {
				t.Errorf("socket directory %s: %v, %v", filepath.Dir(tc.real), st, err)
			}
			assertListens(t, l, tc.socket)
		})
	}
}

// TestSocketUnderVarRun: /var/run is a symbolic link to /run on Debian,
// owned by root in a root-owned directory: followed, and /run checked.
func TestSocketUnderVarRun(t *testing.T) {
	testutil.RequireRoot(t)
	dir, err := os.MkdirTemp("/run", "fog")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	socket := filepath.Join("/var/run", filepath.Base(dir), "run", "s.sock")
	if st, err := os.Lstat("/var/run"); err != nil || st.Mode()&os.ModeSymlink == 0 {
		socket = filepath.Join(dir, "run", "s.sock") // no link on this host: /run itself
	}
	l, err := listen(socket)
	if err != nil {
		t.Fatal(err)
	}
	assertListens(t, l, socket)
}

// TestSocketAncestorRefusedByServer: the server exits 1 with the message.
func TestSocketAncestorRefusedByServer(t *testing.T) {
	testutil.RequireFUSE(t)
	base := shortDir(t)
	open := filepath.Join(base, "open")
	mkdirOwned(t, open, 0o777, otherUID)
	code, out := runCommand(t, nil, filepath.Join(open, "run", "s.sock"), filepath.Join(base, "root"))
	want := fmt.Sprintf("socket path ancestor %s is owned by uid %d (mode 0777)", open, otherUID)
	if code != exitFailure || !strings.Contains(out, want) {
		t.Errorf("exit %d, output %q; want exit %d and %q", code, out, exitFailure, want)
	}
}

// TestSocketRenameRace: someone who renames the socket directory away
// between the checks and bind, or between bind and the server's answer,
// and binds their own socket at the path, makes listen fail; clients
// never reach a socket of theirs through a listener the server returned.
// The swap is made at each step by listen's test hook, so each ordering is
// taken every run.
func TestSocketRenameRace(t *testing.T) {
	for _, step := range []string{"checked", "bound"} {
		t.Run(step, func(t *testing.T) {
			base := shortDir(t)
			dir := filepath.Join(base, "run")
			socket := filepath.Join(dir, "s.sock")
			var attacker net.Listener
			listenHook = func(at string) {
				if at != step {
					return
				}
				if err := os.Rename(dir, filepath.Join(base, "moved")); err != nil {
					t.Error(err)
					return
				}
				if err := os.Mkdir(dir, 0o700); err != nil {
					t.Error(err)
					return
				}
				var err error
				if attacker, err = net.Listen("unix", socket); err != nil {
					t.Error(err)
				}
			}
			defer func() { listenHook = nil }()
			l, err := listen(socket)
			listenHook = nil
			if attacker == nil {
				t.Fatal("the swap did not happen")
			}
			defer func() { _ = attacker.Close() }()
			if err == nil {
				_ = l.Close()
				t.Fatal("listen succeeded although the socket path led to another socket")
			}
			if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "does not lead to the socket bound in the checked directory") {
				t.Errorf("error %v, want a failed precondition about the replaced directory", err)
			}
			// Ours was removed from the moved directory; theirs untouched.
			if entries, err := os.ReadDir(filepath.Join(base, "moved")); err != nil || len(entries) != 0 {
				t.Errorf("moved directory after the refusal: %v, %v", entries, err)
			}
			if st, err := os.Lstat(socket); err != nil || st.Mode()&os.ModeSocket == 0 {
				t.Errorf("the other socket at %s was touched: %v, %v", socket, st, err)
			}
		})
	}
	t.Run("no swap", func(t *testing.T) {
		socket := filepath.Join(shortDir(t), "run", "s.sock")
		l, err := listen(socket)
		if err != nil {
			t.Fatal(err)
		}
		assertListens(t, l, socket)
	})
}

// TestSocketConcurrentAttacker: another user, on a thread of its own,
// keeps trying to rename the socket directory away and put its own
// directory and socket in its place while the server listens again and
// again. Under a sticky directory the kernel refuses every rename (the
// socket directory is not theirs) and every listen dials the server's own
// socket; under a directory others may write without the sticky bit every
// listen is refused, whatever the attacker manages.
func TestSocketConcurrentAttacker(t *testing.T) {
	testutil.RequireRoot(t)
	const rounds = 100
	for _, tc := range []struct {
		name   string
		mode   os.FileMode
		refuse bool
	}{
		{"sticky", 0o777 | os.ModeSticky, false},
		{"not sticky", 0o777, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base := shortDir(t)
			if err := os.Chmod(base, 0o755); err != nil { // the attacker must reach pub
				t.Fatal(err)
			}
			pub := filepath.Join(base, "pub")
			mkdirOwned(t, pub, tc.mode, 0)
			dir := filepath.Join(pub, "run")
			mkdirOwned(t, dir, 0o700, 0)
			socket := filepath.Join(dir, "s.sock")

			stop := make(chan struct{})
			var attempts, renamed int
			var theirs []net.Listener
			attacked := make(chan error, 1)
			go func() {
				attacked <- asUser(otherUID, func() {
					for n := 0; ; n++ {
						select {
						case <-stop:
							return
						default:
						}
						attempts++
						if os.Rename(dir, filepath.Join(pub, fmt.Sprint("moved", n))) != nil {
							continue
						}
						renamed++
						if os.Mkdir(dir, 0o700) == nil {
							if l, err := net.Listen("unix", socket); err == nil {
								theirs = append(theirs, l)
							}
						}
					}
				})
			}()
			succeeded := 0
			for range rounds {
				l, err := listen(socket)
				if err != nil {
					if !tc.refuse {
						t.Errorf("listen under a sticky directory: %v", err)
					}
					continue
				}
				if tc.refuse {
					t.Errorf("listen under %s (mode %v) succeeded", pub, tc.mode)
				}
				succeeded++
				assertDialsOurs(t, l, socket)
			}
			close(stop)
			if err := <-attacked; err != nil {
				t.Fatal(err)
			}
			for _, l := range theirs {
				_ = l.Close()
			}
			t.Logf("%d listens succeeded; the attacker tried %d renames, %d succeeded, bound %d sockets", succeeded, attempts, renamed, len(theirs))
			if attempts == 0 {
				t.Error("the attacker never ran")
			}
			if !tc.refuse && (renamed != 0 || succeeded != rounds) {
				t.Errorf("under a sticky directory: %d renames by another user succeeded, %d of %d listens; want 0 and all", renamed, succeeded, rounds)
			}
		})
	}
}

// assertDialsOurs checks that a client dialling socket reaches l (an
// accept deadline turns a connection that went elsewhere into a failure
// instead of a hang), then closes l.
func assertDialsOurs(t *testing.T, l net.Listener, socket string) {
	t.Helper()
	defer func() { _ = l.Close() }()
	c, err := net.Dial("unix", socket)
	if err != nil {
		t.Errorf("dial %s: %v", socket, err)
		return
	}
	defer func() { _ = c.Close() }()
	if err := l.(*dirListener).SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	a, err := l.Accept()
	if err != nil {
		t.Errorf("the server's listener got no connection from a client of %s: %v", socket, err)
		return
	}
	_ = a.Close()
}
