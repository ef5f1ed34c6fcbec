//go:build linux

package fuseoverlayfs

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	bolterrors "go.etcd.io/bbolt/errors"
)

// TestSecondOpenerFails opens one root twice in this process, as a second
// containerd or proxy server would: the second NewSnapshotter must give up
// after the lock timeout with an error naming the root, of class
// errdefs.ErrUnavailable, keeping bbolt's timeout as its cause, and must
// leave the root alone; once the first closes, the root opens again.
func TestSecondOpenerFails(t *testing.T) {
	root := filepath.Join(t.TempDir(), "root")
	first, err := NewSnapshotter(root)
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			_ = first.Close()
		}
	})
	// Recovery would remove this leftover: it must not run in an opener
	// that does not hold the lock.
	probe := filepath.Join(root, ".probe-held")
	if err := os.Mkdir(probe, 0o700); err != nil {
		t.Fatal(err)
	}

	err = openWithin(t, root, metaStoreTimeout+15*time.Second)
	if err == nil {
		t.Fatal("second NewSnapshotter on a held root succeeded")
	}
	for _, want := range []string{root, "in use by another process"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not contain %q", err, want)
		}
	}
	if !errdefs.IsUnavailable(err) {
		t.Errorf("error %q is not of class errdefs.ErrUnavailable", err)
	}
	if !errors.Is(err, bolterrors.ErrTimeout) {
		t.Errorf("error %q does not wrap bbolt's ErrTimeout", err)
	}
	if _, err := os.Stat(probe); err != nil {
		t.Errorf("the failed opener touched the root: %v", err)
	}

	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	closed = true
	again, err := NewSnapshotter(root)
	if err != nil {
		t.Fatalf("open after the first closed: %v", err)
	}
	if err := again.Close(); err != nil {
		t.Fatal(err)
	}
}

// openWithin runs NewSnapshotter on root and returns its error; it fails the
// test if the call has not returned within limit (it would hang forever
// without a lock timeout), or failed long before the timeout (it would then
// not have waited for the lock at all; bbolt polls every 50 ms, so it gives
// up a little before the exact timeout).
func openWithin(t *testing.T, root string, limit time.Duration) error {
	t.Helper()
	start := time.Now()
	done := make(chan error, 1)
	go func() {
		sn, err := NewSnapshotter(root)
		if err == nil {
			_ = sn.Close()
		}
		done <- err
	}()
	select {
	case err := <-done:
		if took := time.Since(start); err != nil && took < metaStoreTimeout/2 {
			t.Errorf("second opener failed after %s without waiting for the lock (timeout %s): %v", took, metaStoreTimeout, err)
		}
		return err
	case <-time.After(limit):
		t.Fatalf("second NewSnapshotter still waiting after %s", limit)
		return nil
	}
}
