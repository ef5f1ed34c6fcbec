package differ

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"
	"github.com/fosnap/fuseoverlayfs/internal/testutil/tartest"
)

// TestApplyEndsHungProcessor: a layer the applier refuses comes through an
// external stream processor that then stalls with its output open: the
// processor itself, or a child it started. Apply returns the applier's
// error, as containerd's own applier does; the read ahead in flight does
// not keep it waiting.
func TestApplyEndsHungProcessor(t *testing.T) {
	testutil.RequireRoot(t)
	bad := append(bytes.Repeat([]byte{0xff}, 512), layerTar(t, tartest.File("a", 0o644, "x"))...)
	for _, tc := range []struct {
		name   string
		script string // $0 is the file for the PID of what stalls
	}{
		{"processor", `echo $$ > "$0"; cat; exec sleep 1000000`},
		{"child", `sleep 1000000 & echo $! > "$0"; cat; wait`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pidFile := filepath.Join(t.TempDir(), "pid")
			mediaType := "application/vnd.fosnap.test.hang." + tc.name
			diff.RegisterProcessor(diff.BinaryHandler("hang-"+tc.name, ocispec.MediaTypeImageLayer, []string{mediaType},
				"/bin/sh", []string{"-c", tc.script, pidFile}, nil))
			e := newEnv(t)
			desc := ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(bad), Size: int64(len(bad))}
			if err := content.WriteBlob(e.ctx, e.store, desc.Digest.String(), bytes.NewReader(bad), desc); err != nil {
				t.Fatal(err)
			}
			mounts, err := e.sn.Prepare(e.ctx, "extract", "")
			if err != nil {
				t.Fatal(err)
			}
			_, err = e.differ().Apply(e.ctx, desc, mounts)
			// What stalls is killed by its PID (a child outlives the
			// processor, as under containerd's applier).
			pid := readPID(t, pidFile)
			_ = unix.Kill(pid, unix.SIGKILL)
			waitExited(t, pid)
			if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "invalid tar header") {
				t.Fatalf("Apply returned %v, want the applier's ErrInvalidArgument for the bad header", err)
			}
		})
	}
}

func readPID(t *testing.T, pidFile string) int {
	t.Helper()
	b, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

// waitExited waits until process pid has exited.
func waitExited(t *testing.T, pid int) {
	t.Helper()
	fd, err := unix.PidfdOpen(pid, 0)
	if errors.Is(err, unix.ESRCH) {
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = unix.Close(fd) }()
	// A pidfd becomes readable when its process exits.
	for {
		_, err := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, -1)
		if err == nil {
			return
		}
		if !errors.Is(err, unix.EINTR) {
			t.Fatal(err)
		}
	}
}
