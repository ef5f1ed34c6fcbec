package differ

import (
	"archive/tar"
	"compress/gzip"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/archive/compression"
	clabels "github.com/containerd/containerd/v2/pkg/labels"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// fastSnapshot prepares an active snapshot without parent holding one
// file, whose mounts our Compare reads from the layer directory.
func fastSnapshot(t *testing.T, e *env, dif *Differ) []mount.Mount {
	t.Helper()
	mounts, err := e.sn.Prepare(e.ctx, "options", "")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.sn.Remove(e.ctx, "options") })
	if _, _, err := dif.compareLayers(nil, mounts); err != nil {
		t.Fatalf("snapshot mounts not recognised: %v", err)
	}
	if err := os.WriteFile(filepath.Join(mounts[0].Source, "f"), []byte("content"), 0o644); err != nil {
		t.Fatal(err)
	}
	return mounts
}

// blobTar returns the names in the blob desc, decompressed, and the digest
// of the uncompressed tar.
func blobTar(t *testing.T, e *env, desc ocispec.Descriptor) ([]string, digest.Digest) {
	t.Helper()
	ra, err := e.store.ReaderAt(e.ctx, desc)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ra.Close() }()
	r, err := compression.DecompressStream(content.NewReader(ra))
	if err != nil {
		t.Fatal(err)
	}
	dg := digest.Canonical.Digester()
	tr := tar.NewReader(io.TeeReader(r, dg.Hash()))
	var names []string
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
	}
	if _, err := io.Copy(io.Discard, r); err != nil {
		t.Fatal(err)
	}
	return names, dg.Digest()
}

// noUploads fails if an upload was left in the store.
func noUploads(t *testing.T, e *env, after string) {
	t.Helper()
	st, err := e.store.ListStatuses(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(st) != 0 {
		t.Errorf("after %s: uploads left in the store: %+v", after, st)
	}
}

// TestCompareOptions: our Compare honours the options as containerd's
// walking differ does: media types and compression, a custom compressor,
// a reused reference, the uncompressed-digest label (also on a blob that
// was already stored without it), and refusals that leave no upload.
func TestCompareOptions(t *testing.T) {
	testutil.RequireRoot(t)
	e := newEnv(t)
	dif := e.differ()
	mounts := fastSnapshot(t, e, dif)
	RegisterMetrics()
	// compare runs our Compare and checks that it took the fast path.
	compare := func(opts ...diff.Opt) (ocispec.Descriptor, error) {
		before := compareCounts(t)
		desc, err := dif.Compare(e.ctx, nil, mounts, opts...)
		got := compareCounts(t)
		if got[0]+got[1] != before[0]+before[1]+1 || got[2]+got[3] != before[2]+before[3] {
			t.Fatalf("Compare did not take the fast path once (counts %v -> %v)", before, got)
		}
		return desc, err
	}

	for _, c := range []struct {
		opts      []diff.Opt
		mediaType string
		labelled  bool
	}{
		{nil, ocispec.MediaTypeImageLayerGzip, true},
		{[]diff.Opt{diff.WithMediaType(ocispec.MediaTypeImageLayer)}, ocispec.MediaTypeImageLayer, false},
		{[]diff.Opt{diff.WithMediaType(ocispec.MediaTypeImageLayerZstd)}, ocispec.MediaTypeImageLayerZstd, true},
		{[]diff.Opt{diff.WithMediaType("application/vnd.example.layer+gzip"), diff.WithCompressor(func(w io.Writer, mt string) (io.WriteCloser, error) {
			return gzip.NewWriter(w), nil
		})}, "application/vnd.example.layer+gzip", true},
	} {
		desc, err := compare(c.opts...)
		if err != nil {
			t.Fatalf("%s: %v", c.mediaType, err)
		}
		names, diffID := blobTar(t, e, desc)
		if desc.MediaType != c.mediaType || strings.Join(names, ",") != "f" {
			t.Errorf("%s: got %s holding %v, want that media type holding f", c.mediaType, desc.MediaType, names)
		}
		info, err := e.store.Info(e.ctx, desc.Digest)
		if err != nil {
			t.Fatal(err)
		}
		if got := info.Labels[clabels.LabelUncompressed]; c.labelled && got != diffID.String() {
			t.Errorf("%s: uncompressed label %q, want %s", c.mediaType, got, diffID)
		}
	}

	// A reference given twice, and one whose upload was left with other
	// data in it: the upload starts empty.
	first, err := compare(diff.WithReference("options-ref"))
	if err != nil {
		t.Fatal(err)
	}
	again, err := compare(diff.WithReference("options-ref"))
	if err != nil || again.Digest != first.Digest {
		t.Fatalf("second compare with the same reference: %v %v, want %s", again.Digest, err, first.Digest)
	}
	w, err := content.OpenWriter(e.ctx, e.store, content.WithRef("options-stale"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write([]byte("stale data of an interrupted upload")); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if stale, err := compare(diff.WithReference("options-stale")); err != nil || stale.Digest != first.Digest {
		t.Fatalf("compare into a stale upload: %v %v, want %s", stale.Digest, err, first.Digest)
	}

	// A blob already stored without the label gets it back.
	info, err := e.store.Info(e.ctx, first.Digest)
	if err != nil {
		t.Fatal(err)
	}
	want := info.Labels[clabels.LabelUncompressed]
	info.Labels = map[string]string{clabels.LabelUncompressed: ""}
	if _, err := e.store.Update(e.ctx, info, "labels."+clabels.LabelUncompressed); err != nil {
		t.Fatal(err)
	}
	if info, err := e.store.Info(e.ctx, first.Digest); err != nil || info.Labels[clabels.LabelUncompressed] != "" {
		t.Fatalf("label not removed: %v %v", info.Labels, err)
	}
	if _, err := compare(); err != nil {
		t.Fatal(err)
	}
	if info, err := e.store.Info(e.ctx, first.Digest); err != nil || info.Labels[clabels.LabelUncompressed] != want || want == "" {
		t.Errorf("stored blob's label after compare: %v %v, want %s", info.Labels, err, want)
	}
	noUploads(t, e, "the successful compares")

	// Refusals.
	if _, err := compare(diff.WithMediaType("application/x-unknown")); !errdefs.IsNotImplemented(err) {
		t.Errorf("unknown media type: got %v, want not implemented", err)
	}
	if _, err := compare(diff.WithCompressor(func(w io.Writer, _ string) (io.WriteCloser, error) { return gzip.NewWriter(w), nil })); err == nil ||
		!strings.Contains(err.Error(), "media type must be explicitly specified") {
		t.Errorf("custom compressor without media type: got %v", err)
	}
	broken := errors.New("compressor broken")
	if _, err := compare(diff.WithMediaType("application/vnd.example"), diff.WithCompressor(func(io.Writer, string) (io.WriteCloser, error) { return nil, broken })); !errors.Is(err, broken) {
		t.Errorf("failing compressor: got %v, want its error", err)
	}
	if _, err := compare(diff.WithMediaType("application/vnd.example"), diff.WithCompressor(func(io.Writer, string) (io.WriteCloser, error) { return failWriter{broken}, nil })); !errors.Is(err, broken) {
		t.Errorf("compressor failing to write: got %v, want its error", err)
	}
	noUploads(t, e, "the refused compares")
}

// failWriter fails every write and close with err.
type failWriter struct{ err error }

func (f failWriter) Write([]byte) (int, error) { return 0, f.err }
func (f failWriter) Close() error              { return f.err }
