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

// hangMediaType is a blob type whose stream processor (registered by
// TestApplyEndsHungProcessor) passes the blob on and then never exits.
const hangMediaType = "application/vnd.fosnap.test.hang"

// TestApplyEndsHungProcessor: a layer the applier refuses comes through an
// external stream processor that then hangs with its output open. Apply
// returns the applier's error (the read ahead in flight does not keep it
// waiting) and the processor is killed.
func TestApplyEndsHungProcessor(t *testing.T) {
	testutil.RequireRoot(t)
	pidFile := filepath.Join(t.TempDir(), "pid")
	diff.RegisterProcessor(diff.BinaryHandler("hang", ocispec.MediaTypeImageLayer, []string{hangMediaType},
		"/bin/sh", []string{"-c", `echo $$ > "$0"; cat; exec sleep 1000000`, pidFile}, nil))

	e := newEnv(t)
	// A block that is no tar header (its checksum is wrong), then a layer.
	bad := append(bytes.Repeat([]byte{0xff}, 512), layerTar(t, tartest.File("a", 0o644, "x"))...)
	desc := ocispec.Descriptor{MediaType: hangMediaType, Digest: digest.FromBytes(bad), Size: int64(len(bad))}
	if err := content.WriteBlob(e.ctx, e.store, desc.Digest.String(), bytes.NewReader(bad), desc); err != nil {
		t.Fatal(err)
	}
	mounts, err := e.sn.Prepare(e.ctx, "extract", "")
	if err != nil {
		t.Fatal(err)
	}
	_, err = e.differ().Apply(e.ctx, desc, mounts)
	if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "invalid tar header") {
		t.Fatalf("Apply returned %v, want the applier's ErrInvalidArgument for the bad header", err)
	}
	waitExited(t, pidFile)
}

// waitExited waits until the process whose PID is in pidFile has exited.
func waitExited(t *testing.T, pidFile string) {
	t.Helper()
	b, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
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
