package layer

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/pkg/archive"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// Sparse map forms a generated tar uses.
const (
	form00 = "pax0.0"
	form01 = "pax0.1"
	form10 = "pax1.0"
)

var sparseForms = []string{form00, form01, form10}

// sparseCase is one generated sparse entry: its map may be hostile.
type sparseCase struct {
	form    string
	size    int64
	regions []dataRegion // as declared, maybe unsorted or overlapping
	data    []byte       // what the entry holds
	kind    string       // what the generator made
	bad     bool         // archive/tar (and so containerd) refuses it
}

// sparseEntry encodes c as the blocks of one sparse entry named name.
func sparseEntry(name string, c sparseCase) []byte {
	var recs string
	var body []byte
	switch c.form {
	case form00:
		for _, r := range c.regions {
			recs += paxRecord("GNU.sparse.offset", fmt.Sprint(r.off)) + paxRecord("GNU.sparse.numbytes", fmt.Sprint(r.len))
		}
		recs += paxRecord("GNU.sparse.numblocks", fmt.Sprint(len(c.regions))) + paxRecord("GNU.sparse.size", fmt.Sprint(c.size))
	case form01:
		var m []string
		for _, r := range c.regions {
			m = append(m, fmt.Sprint(r.off), fmt.Sprint(r.len))
		}
		recs += paxRecord("GNU.sparse.numblocks", fmt.Sprint(len(c.regions))) + paxRecord("GNU.sparse.map", strings.Join(m, ",")) +
			paxRecord("GNU.sparse.size", fmt.Sprint(c.size))
	case form10:
		recs += paxRecord("GNU.sparse.major", "1") + paxRecord("GNU.sparse.minor", "0") + paxRecord("GNU.sparse.realsize", fmt.Sprint(c.size))
		m := fmt.Sprintf("%d\n", len(c.regions))
		for _, r := range c.regions {
			m += fmt.Sprintf("%d\n%d\n", r.off, r.len)
		}
		body = pad512([]byte(m))
	}
	recs += paxRecord("GNU.sparse.name", name)
	body = append(body, c.data...)
	var out []byte
	out = append(out, sealHeader(rawHeader("./PaxHeaders/sparse", tar.TypeXHeader, int64(len(recs)), false))...)
	out = append(out, pad512([]byte(recs))...)
	out = append(out, sealHeader(rawHeader("GNUSparseFile.0/sparse", tar.TypeReg, int64(len(body)), false))...)
	return append(out, pad512(body)...)
}

// sparseTarOf encodes c as a tar holding the sparse file "f" (and a plain
// file after it, which must come out right too).
func sparseTarOf(c sparseCase) []byte {
	out := sparseEntry("f", c)
	after := []byte("after the sparse file\n")
	out = append(out, sealHeader(rawHeader("g", tar.TypeReg, int64(len(after)), false))...)
	out = append(out, pad512(after)...)
	return append(out, make([]byte, 1024)...)
}

// genSparse makes a sparse entry from the choices of ch: many small
// regions, a huge file with a few, none at all, zero-length regions, or a
// hostile map (overlapping, unsorted, past the size, negative, data that
// does not match the map).
func genSparse(ch chooser) sparseCase {
	c := sparseCase{form: sparseForms[ch.intn(len(sparseForms))]}
	kinds := []string{"many", "many", "huge", "huge", "empty", "zero-length", "overlap", "unsorted", "past-size", "negative", "short-data", "long-data"}
	c.kind = kinds[ch.intn(len(kinds))]
	n := 1 + ch.intn(8)
	var gap int64 = 1 << 20
	switch c.kind {
	case "many":
		n = 1 + ch.intn(2000)
		gap = 4096
	case "huge":
		gap = 1 << 36 // 64 GiB between regions: 1 TiB apparent at most
	case "empty":
		n = 0
	}
	var off int64
	for i := 0; i < n; i++ {
		off += int64(ch.intn(int(min(gap, 1<<30)))) * max(1, gap>>30)
		l := int64(1 + ch.intn(700))
		if c.kind == "zero-length" && ch.intn(2) == 0 {
			l = 0
		}
		c.regions = append(c.regions, dataRegion{off, l})
		off += l
	}
	if len(c.regions) == 0 {
		// A PAX map without a region (and without a version record) is
		// no sparse file to archive/tar.
		c.form = form10
	}
	c.size = off + int64(ch.intn(3))*int64(ch.intn(1<<20))
	if c.kind == "huge" {
		c.size = max(c.size, 1<<40)
	}
	switch c.kind {
	case "overlap":
		c.regions = append(c.regions, dataRegion{max(0, off-1-int64(ch.intn(int(min(off, 100))))), 2})
		c.size = max(c.size, off+2)
		c.bad = true
	case "unsorted":
		// Before the end of the region ahead of it: archive/tar wants
		// regions in order.
		c.regions = append(c.regions, dataRegion{0, 1})
		c.bad = true
	case "past-size":
		c.size = off - 1
		c.bad = true
	case "negative":
		c.regions[ch.intn(len(c.regions))].len = -1
		c.bad = true
	}
	var data int64
	for _, r := range c.regions {
		data += max(0, r.len)
	}
	c.data = make([]byte, data)
	for i := range c.data {
		c.data[i] = byte('a' + (i*7+ch.intn(3))%26)
	}
	switch c.kind {
	case "short-data":
		c.data = c.data[:len(c.data)-1]
		c.bad = true
	case "long-data":
		c.data = append(c.data, 'x')
		c.bad = true
	}
	return c
}

// expectSparse checks that the layer's file "f" is c's apparent content
// without reading its holes: the data regions read back, and every extent
// the file system holds lies within a region's blocks.
func expectSparse(t *testing.T, p string, c sparseCase) {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	if st.Size != c.size {
		t.Errorf("size %d, want %d", st.Size, c.size)
	}
	var data, blocks int64
	pos := int64(0)
	for _, r := range c.regions {
		got := make([]byte, r.len)
		if _, err := f.ReadAt(got, r.off); err != nil && !errors.Is(err, io.EOF) {
			t.Fatalf("read region at %d: %v", r.off, err)
		}
		if !bytes.Equal(got, c.data[pos:pos+r.len]) {
			t.Errorf("region at %d (%d bytes) reads %.32q..., want %.32q...", r.off, r.len, got, c.data[pos:pos+r.len])
		}
		pos += r.len
		data += r.len
		if r.len > 0 {
			blocks += (r.off+r.len+4095)/4096 - r.off/4096
		}
	}
	// Holes: each extent of data lies within the blocks of adjacent regions.
	var spans [][2]int64
	for _, r := range c.regions {
		if r.len == 0 {
			continue
		}
		a, b := r.off&^4095, (r.off+r.len+4095)&^4095
		if n := len(spans); n > 0 && spans[n-1][1] >= a {
			spans[n-1][1] = max(spans[n-1][1], b)
		} else {
			spans = append(spans, [2]int64{a, b})
		}
	}
	for off := int64(0); off < st.Size; {
		d, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		h, err := unix.Seek(int(f.Fd()), d, unix.SEEK_HOLE)
		if err != nil {
			t.Fatal(err)
		}
		in := false
		for _, sp := range spans {
			in = in || (d >= sp[0] && h <= max(sp[1], c.size))
			if sp[0] > d {
				break
			}
		}
		if !in {
			t.Errorf("data at [%d, %d), where the map has a hole", d, h)
			break
		}
		off = h
	}
	if alloc := st.Blocks * 512; alloc > (blocks+16)*4096 {
		t.Errorf("%d bytes allocated for %d bytes of data in %d blocks: holes were written", alloc, data, blocks)
	}
}

// countingReader counts what Apply reads of a tar.
type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// TestSparseGenerated: generated sparse maps in the three PAX forms. A map
// archive/tar refuses (overlapping, unsorted, past the size, negative, data
// not matching it) is refused with ErrInvalidArgument, as containerd's
// archive.Apply refuses it; any other gives containerd's tree (compared
// where containerd can write the zeros), with holes kept. The cost is
// counted: Apply reads no more than the tar and makes at most two content
// calls per region and chunk, whatever the apparent size (up to 1 TiB).
func TestSparseGenerated(t *testing.T) {
	testutil.RequireRoot(t)
	const seeds = 60
	for seed := int64(1); seed <= seeds; seed++ {
		c := genSparse(newPCGChooser(seed))
		t.Run(fmt.Sprintf("%d-%s-%s", seed, c.form, c.kind), func(t *testing.T) {
			data := sparseTarOf(c)
			layer := filepath.Join(t.TempDir(), "fs")
			if err := os.Mkdir(layer, 0o755); err != nil {
				t.Fatal(err)
			}
			cr := &countingReader{r: bytes.NewReader(data)}
			ops0 := dataOps.Load()
			err := Apply(context.Background(), layer, cr, Options{})
			ops := dataOps.Load() - ops0
			if c.bad {
				if !errdefs.IsInvalidArgument(err) {
					t.Fatalf("map %v of %d bytes (%d data bytes): Apply returned %v, want ErrInvalidArgument", c.regions, c.size, len(c.data), err)
				}
				native := t.TempDir()
				if _, nerr := archive.Apply(context.Background(), native, bytes.NewReader(data)); nerr == nil {
					t.Errorf("containerd accepts what Apply refuses (%v)", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("map of %d regions, %d bytes: %v", len(c.regions), c.size, err)
			}
			if cr.n > int64(len(data)) {
				t.Errorf("read %d bytes of a %d-byte tar", cr.n, len(data))
			}
			chunks := int64(len(c.data))>>20 + 1
			if limit := 2*int64(len(c.regions)) + chunks + 1; ops > limit {
				t.Errorf("%d content calls for %d regions, want at most %d", ops, len(c.regions), limit)
			}
			t.Logf("%d-byte tar, %d regions, apparent %d bytes: read %d bytes, %d content calls", len(data), len(c.regions), c.size, cr.n, ops)
			expectSparse(t, filepath.Join(layer, "f"), c)
			if got, err := os.ReadFile(filepath.Join(layer, "g")); err != nil || string(got) != "after the sparse file\n" {
				t.Errorf("the entry after the sparse file reads %q, %v", got, err)
			}
			if c.size <= 8<<20 {
				native := t.TempDir()
				if _, err := archive.Apply(context.Background(), native, bytes.NewReader(data)); err != nil {
					t.Fatalf("containerd refuses what Apply accepts: %v", err)
				}
				if d := testutil.TreeDiff(tree(t, native), tree(t, layer)); len(d) > 0 {
					t.Errorf("tree differs from containerd's:\n%s", strings.Join(d, "\n"))
				}
			}
		})
	}
}

// TestSparseTerabyte: a tar of a few KB declaring a 1 TiB file costs what
// the tar holds: the figures are in the log (and the report).
func TestSparseTerabyte(t *testing.T) {
	testutil.RequireRoot(t)
	c := sparseCase{form: form10, size: 1 << 40}
	for i := int64(0); i < 64; i++ {
		c.regions = append(c.regions, dataRegion{i * (1 << 40) / 64, 32})
	}
	c.data = bytes.Repeat([]byte("0123456789abcdef"), 128)
	data := sparseTarOf(c)
	layer := filepath.Join(t.TempDir(), "fs")
	if err := os.Mkdir(layer, 0o755); err != nil {
		t.Fatal(err)
	}
	cr := &countingReader{r: bytes.NewReader(data)}
	ops0, fs0 := dataOps.Load(), fsOps.Load()
	if err := Apply(context.Background(), layer, cr, Options{}); err != nil {
		t.Fatal(err)
	}
	ops, fsops := dataOps.Load()-ops0, fsOps.Load()-fs0
	var st unix.Stat_t
	if err := unix.Stat(filepath.Join(layer, "f"), &st); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d-byte tar declaring %d bytes: read %d bytes, %d content calls (writes and truncates), %d name operations, %d bytes allocated",
		len(data), c.size, cr.n, ops, fsops, st.Blocks*512)
	if ops != 65 {
		t.Errorf("%d content calls, want 65 (a write per region, one truncate)", ops)
	}
	if cr.n > int64(len(data)) {
		t.Errorf("read %d bytes of a %d-byte tar", cr.n, len(data))
	}
	expectSparse(t, filepath.Join(layer, "f"), c)
}

// TestSparseOldGNURefused: an old GNU sparse entry (type 'S') is refused
// with ErrInvalidArgument naming it, as containerd refuses it.
func TestSparseOldGNURefused(t *testing.T) {
	data := sparseTar("old", 1<<20, []sparseRegion{{4096, []byte("data")}}, true)
	layer := filepath.Join(t.TempDir(), "fs")
	if err := os.Mkdir(layer, 0o755); err != nil {
		t.Fatal(err)
	}
	err := Apply(context.Background(), layer, bytes.NewReader(data), Options{})
	if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), `"old"`) {
		t.Errorf("Apply returned %v, want ErrInvalidArgument naming \"old\"", err)
	}
	if _, err := archive.Apply(context.Background(), t.TempDir(), bytes.NewReader(data)); err == nil {
		t.Error("containerd accepts the old GNU sparse entry")
	}
	if _, err := os.Lstat(filepath.Join(layer, "old")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the refused entry exists: %v", err)
	}
}

// TestSparseGNUTar: what GNU tar writes (--sparse in every PAX sparse
// version) applies as containerd applies it, holes kept.
func TestSparseGNUTar(t *testing.T) {
	testutil.RequireRoot(t)
	if _, err := exec.LookPath("tar"); err != nil {
		t.Fatal("GNU tar is needed: ", err)
	}
	src := t.TempDir()
	const size = 64 << 20
	c := sparseCase{size: size, regions: []dataRegion{{0, 10}, {1 << 20, 5000}, {size - 3, 3}}}
	f, err := os.Create(filepath.Join(src, "f"))
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range c.regions {
		b := bytes.Repeat([]byte{byte('A' + r.off%26)}, int(r.len))
		c.data = append(c.data, b...)
		if _, err := f.WriteAt(b, r.off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	for _, v := range []string{"0.0", "0.1", "1.0"} {
		t.Run(v, func(t *testing.T) {
			var out, msg bytes.Buffer
			cmd := exec.Command("tar", "-C", src, "--format=posix", "--sparse", "--sparse-version="+v, "-cf", "-", "f")
			cmd.Stdout, cmd.Stderr = &out, &msg
			if err := cmd.Run(); err != nil {
				t.Fatalf("tar: %v: %s", err, msg.Bytes())
			}
			data := out.Bytes()
			layer := filepath.Join(t.TempDir(), "fs")
			if err := os.Mkdir(layer, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := Apply(context.Background(), layer, bytes.NewReader(data), Options{}); err != nil {
				t.Fatal(err)
			}
			native := t.TempDir()
			if _, err := archive.Apply(context.Background(), native, bytes.NewReader(data)); err != nil {
				t.Fatal(err)
			}
			if d := testutil.TreeDiff(tree(t, native), tree(t, layer)); len(d) > 0 {
				t.Errorf("tree differs from containerd's:\n%s", strings.Join(d, "\n"))
			}
			// GNU tar stores whole blocks of data: the regions as it saw them.
			var st unix.Stat_t
			if err := unix.Stat(filepath.Join(layer, "f"), &st); err != nil {
				t.Fatal(err)
			}
			if st.Size != size || st.Blocks*512 > 64<<10 {
				t.Errorf("size %d (want %d), %d bytes allocated (want <= 64 KiB)", st.Size, size, st.Blocks*512)
			}
		})
	}
}

// makeSparseFile writes a file of apparent size size holding data at each
// offset of offs.
func makeSparseFile(t *testing.T, p string, size int64, offs []int64, data []byte) {
	t.Helper()
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	for _, off := range offs {
		if _, err := f.WriteAt(data, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestCopyUpKeepsHoles: a layer that hard-links a lower file forces a copy
// of it; a lower file of 1 TiB apparent size and a few KiB of data stays a
// few KiB allocated (sequential apply, and detached then finished), with
// its content.
func TestCopyUpKeepsHoles(t *testing.T) {
	testutil.RequireRoot(t)
	const size = 1 << 40
	offs := []int64{0, 1 << 30, 1<<39 + 12345, size - 4096}
	data := bytes.Repeat([]byte("lower data "), 372) // 4092 bytes
	c := sparseCase{size: size}
	for _, off := range offs {
		c.regions = append(c.regions, dataRegion{off, int64(len(data))})
		c.data = append(c.data, data...)
	}
	for _, detached := range []bool{false, true} {
		t.Run(fmt.Sprint("detached=", detached), func(t *testing.T) {
			s := newStack(t, 2)
			makeSparseFile(t, filepath.Join(s.dirs[0], "f"), size, offs, data)
			layer := tarOf(t, hardlink("l", "f"))
			opts := Options{Lowers: s.lowers(1)}
			if detached {
				opts = Options{Detached: true, StateFile: s.state(1)}
			}
			ops0 := dataOps.Load()
			if err := Apply(context.Background(), s.dirs[1], bytes.NewReader(layer), opts); err != nil {
				t.Fatal(err)
			}
			if detached {
				if err := Finish(context.Background(), s.dirs[1], s.state(1), s.lowers(1)); err != nil {
					t.Fatal(err)
				}
			}
			ops := dataOps.Load() - ops0
			t.Logf("copy-up of a %d-byte file with %d data regions: %d content calls", int64(size), len(offs), ops)
			// Two seeks per region and one after, a copy per region, a truncate.
			if limit := int64(3*len(offs) + 3); ops > limit {
				t.Errorf("%d content calls, want at most %d", ops, limit)
			}
			expectSparse(t, filepath.Join(s.dirs[1], "f"), c)
			var a, b unix.Stat_t
			if err := unix.Stat(filepath.Join(s.dirs[1], "f"), &a); err != nil {
				t.Fatal(err)
			}
			if err := unix.Stat(filepath.Join(s.dirs[1], "l"), &b); err != nil {
				t.Fatal(err)
			}
			if a.Ino != b.Ino {
				t.Error("l is not a hard link to the copied-up f")
			}
		})
	}
}

// TestCopyUpCancelled: a copy-up cancelled as it reaches a data region
// copies nothing more (the context is checked before each chunk).
func TestCopyUpCancelled(t *testing.T) {
	testutil.RequireRoot(t)
	src, dst := t.TempDir(), t.TempDir()
	const chunks = 64
	f, err := os.Create(filepath.Join(src, "f"))
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(chunks * copyChunk); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("x"), chunks*copyChunk-1); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	sd, err := openLayerDir(src)
	if err != nil {
		t.Fatal(err)
	}
	defer sd.close()
	dd, err := openLayerDir(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer dd.close()
	in, err := sd.openRegular("f")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = in.Close() }()
	out, err := dd.create("f")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = out.Close() }()
	// The cancel comes as the first data region is reached: copyRange
	// checks the context before each chunk, so nothing is copied.
	ctx, cancel := context.WithCancel(context.Background())
	calls := 0
	err = forData(ctx, in, chunks*copyChunk, func(off, n int64) error {
		calls++
		cancel()
		return copyRange(ctx, in, out, off, n)
	})
	if !errors.Is(err, context.Canceled) {
		t.Errorf("copy returned %v, want context.Canceled", err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(out.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	if calls != 1 || st.Size != 0 {
		t.Errorf("%d regions copied, %d bytes written after the cancel; want 1 region reached and nothing written", calls, st.Size)
	}
}

// cancelWriter counts what it is given and cancels its context once it has
// had at least at bytes.
type cancelWriter struct {
	n, at, atCancel int64
	cancel          func()
}

func (c *cancelWriter) Write(p []byte) (int, error) {
	c.n += int64(len(p))
	if c.atCancel == 0 && c.n >= c.at {
		c.atCancel = c.n
		c.cancel()
	}
	return len(p), nil
}

// TestExportSparseCancelled: a container's `truncate -s 64G f` exported,
// its context cancelled after 16 MiB of tar: Export returns
// context.Canceled having written at most one more chunk.
func TestExportSparseCancelled(t *testing.T) {
	testutil.RequireRoot(t)
	upper := t.TempDir()
	makeSparseFile(t, filepath.Join(upper, "f"), 64<<30, []int64{1 << 20}, []byte("data"))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	w := &cancelWriter{at: 16 << 20, cancel: cancel}
	err := Export(ctx, w, upper, ExportOptions{})
	after := w.n - w.atCancel
	t.Logf("wrote %d bytes after the cancel, %d in all", after, w.n)
	if !errors.Is(err, context.Canceled) {
		t.Errorf("Export returned %v, want context.Canceled", err)
	}
	if after > exportChunk+4096 {
		t.Errorf("Export wrote %d bytes after the cancel, want at most one chunk (%d) and a tar block", after, exportChunk)
	}
}

// TestExportSparseContent: a sparse file is exported as a plain entry with
// its apparent content (as containerd's archive.WriteDiff writes it),
// reading only its data regions.
func TestExportSparseContent(t *testing.T) {
	testutil.RequireRoot(t)
	upper, empty := t.TempDir(), t.TempDir()
	const size = 40 << 20
	offs := []int64{0, 3 << 20, 3<<20 + 5000, 17<<20 + 1, size - 7}
	makeSparseFile(t, filepath.Join(upper, "f"), size, offs, []byte("region!"))
	want, err := os.ReadFile(filepath.Join(upper, "f"))
	if err != nil {
		t.Fatal(err)
	}
	var ours, theirs bytes.Buffer
	ops0 := dataOps.Load()
	if err := Export(context.Background(), &ours, upper, ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	ops := dataOps.Load() - ops0
	if err := archive.WriteDiff(context.Background(), &theirs, empty, upper); err != nil {
		t.Fatal(err)
	}
	for name, b := range map[string][]byte{"ours": ours.Bytes(), "containerd's": theirs.Bytes()} {
		tr := tar.NewReader(bytes.NewReader(b))
		found := false
		for {
			hdr, err := tr.Next()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("%s tar: %v", name, err)
			}
			if strings.TrimPrefix(hdr.Name, "/") != "f" {
				continue
			}
			found = true
			got, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			if hdr.Typeflag != tar.TypeReg || !bytes.Equal(got, want) {
				t.Errorf("%s entry f: type %q, %d bytes, content equal %v; want a regular entry of %d bytes", name, hdr.Typeflag, len(got), bytes.Equal(got, want), size)
			}
		}
		if !found {
			t.Errorf("%s tar has no f", name)
		}
	}
	// Four data extents (two regions share blocks): two seeks and a read
	// each, two seeks more at the end.
	t.Logf("%d content calls", ops)
	if ops > 3*int64(len(offs))+2 {
		t.Errorf("%d content calls for %d data regions: holes were read", ops, len(offs))
	}
}

// genSparseLayers is the containment grammar's layers (genLayers) with
// sparse entries put in by ch: on a name the layers use (a directory, a
// symlink, a name under either) or a new one, maps as genSparse makes them
// but small (containerd's extraction, compared with, writes the zeros).
func genSparseLayers(ch chooser) [][]ent {
	layers := genLayers(ch)
	var names []string
	for _, l := range layers {
		for _, e := range l {
			names = append(names, e.name)
		}
	}
	for range 1 + ch.intn(3) {
		// Mostly maps containerd takes, so that trees can be compared.
		c := genSparse(ch)
		for c.kind == "huge" || (c.bad && ch.intn(4) != 0) {
			c = genSparse(ch)
		}
		name := "sparse"
		if len(names) > 0 {
			name = names[ch.intn(len(names))]
			if ch.intn(2) == 0 {
				name = strings.TrimSuffix(name, "/") + "/sparse"
			}
		}
		li := ch.intn(len(layers))
		pos := ch.intn(len(layers[li]) + 1)
		e := ent{name: name, typ: tar.TypeReg, mode: 0o644, sparse: &c}
		layers[li] = append(layers[li][:pos], append([]ent{e}, layers[li][pos:]...)...)
	}
	return layers
}

// TestContainmentSparse runs the containment harness (TestContainment's
// checks, every mode and whiteout form) on generated layers holding sparse
// entries, hostile maps among them: nothing outside the layer changes, and
// where containerd's extraction succeeds the tree through fuse-overlayfs
// is the same. SPARSE_SEEDS sets how many (default 30).
func TestContainmentSparse(t *testing.T) {
	testutil.RequireFUSE(t)
	t.Cleanup(func() { testutil.RequireNoLeftovers(t, "TestContainmentSparse") })
	h := newHarness(t)
	n := envInt(t, "SPARSE_SEEDS", 30)
	compared := 0
	for i := range n {
		seed := int64(containBaseSeed + 7000 + i)
		layers := genSparseLayers(newPCGChooser(seed))
		nat := h.native(layers)
		if nat.usable {
			compared++
		}
		for _, sp := range allSpecs() {
			if f := h.check(layers, sp, &nat); f != nil {
				t.Errorf("seed %d %s: %s:\n\t%s\nlayers:\n%s", seed, sp, f.kind, firstLines(f.details, 12), formatLayers(layers))
			}
		}
	}
	t.Logf("%d sequences, %d compared with containerd's extraction", n, compared)
	if compared == 0 {
		t.Error("no sequence could be compared with containerd's extraction")
	}
}

// TestSparseSkipped: a sparse entry Apply does not write (a whiteout name,
// the layer root) is skipped at the cost of its tar bytes, not of its
// apparent size, and the entries after it come out right.
func TestSparseSkipped(t *testing.T) {
	testutil.RequireRoot(t)
	for _, name := range []string{".wh.x", "./", "d/.wh..wh..opq"} {
		t.Run(name, func(t *testing.T) {
			c := sparseCase{form: form10, size: 1 << 40, regions: []dataRegion{{1 << 39, 5}}, data: []byte("hello")}
			data := append(sparseEntry(name, c), sparseTarOf(c)...)
			layer := filepath.Join(t.TempDir(), "fs")
			if err := os.MkdirAll(filepath.Join(layer, "d"), 0o755); err != nil {
				t.Fatal(err)
			}
			cr := &countingReader{r: bytes.NewReader(data)}
			ops0 := dataOps.Load()
			if err := Apply(context.Background(), layer, cr, Options{}); err != nil {
				t.Fatal(err)
			}
			if ops := dataOps.Load() - ops0; ops != 2 {
				t.Errorf("%d content calls, want 2 (the second sparse file's write and truncate)", ops)
			}
			if cr.n > int64(len(data)) {
				t.Errorf("read %d bytes of a %d-byte tar", cr.n, len(data))
			}
			expectSparse(t, filepath.Join(layer, "f"), c)
			if got, err := os.ReadFile(filepath.Join(layer, "g")); err != nil || string(got) != "after the sparse file\n" {
				t.Errorf("the entry after the sparse files reads %q, %v", got, err)
			}
		})
	}
}

// BenchmarkSparseApply: a tar of a few KB declaring a 256 MiB sparse file,
// applied by Apply and by containerd's archive.Apply (which writes the
// zeros). Compare the two in one run.
func BenchmarkSparseApply(b *testing.B) {
	c := sparseCase{form: form10, size: 256 << 20}
	for i := int64(0); i < 64; i++ {
		c.regions = append(c.regions, dataRegion{i * c.size / 64, 32})
	}
	c.data = bytes.Repeat([]byte("0123456789abcdef"), 128)
	data := sparseTarOf(c)
	for _, impl := range []string{"ours", "containerd"} {
		b.Run(impl, func(b *testing.B) {
			for b.Loop() {
				b.StopTimer()
				dir := filepath.Join(b.TempDir(), "fs")
				if err := os.Mkdir(dir, 0o755); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				var err error
				if impl == "ours" {
					err = Apply(context.Background(), dir, bytes.NewReader(data), Options{})
				} else {
					_, err = archive.Apply(context.Background(), dir, bytes.NewReader(data))
				}
				if err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestSparseRecordsInGlobalHeader: GNU.sparse records in a PAX global
// header describe no entry (Go hands them over as they are and applies
// them to nothing); the layer applies as containerd applies it.
func TestSparseRecordsInGlobalHeader(t *testing.T) {
	for _, recs := range []string{
		paxRecord("GNU.sparse.major", "1") + paxRecord("GNU.sparse.minor", "0"),
		paxRecord("GNU.sparse.map", "0,1") + paxRecord("GNU.sparse.numblocks", "1"),
	} {
		var data []byte
		data = append(data, sealHeader(rawHeader("pax_global_header", tar.TypeXGlobalHeader, int64(len(recs)), false))...)
		data = append(data, pad512([]byte(recs))...)
		data = append(data, sealHeader(rawHeader("g", tar.TypeReg, 1, false))...)
		data = append(data, pad512([]byte("x"))...)
		data = append(data, make([]byte, 1024)...)
		native := t.TempDir()
		if _, err := archive.Apply(context.Background(), native, bytes.NewReader(data)); err != nil {
			t.Fatalf("containerd: %v", err)
		}
		ours := t.TempDir()
		if err := Apply(context.Background(), ours, bytes.NewReader(data), Options{}); err != nil {
			t.Fatalf("records %q: %v", recs, err)
		}
		if got, err := os.ReadFile(filepath.Join(ours, "g")); err != nil || string(got) != "x" {
			t.Errorf("records %q: g = %q, %v; want \"x\"", recs, got, err)
		}
	}
}

// TestSparseAfterManyHeaders: PAX and GNU long-name headers before a
// sparse entry, each replacing the one before and each within
// archive/tar's 1 MiB, may add up to more than maxHeaderBytes: the entry
// applies as containerd applies it.
func TestSparseAfterManyHeaders(t *testing.T) {
	testutil.RequireRoot(t)
	for _, form := range sparseForms {
		t.Run(form, func(t *testing.T) {
			var data []byte
			for i := 0; len(data) <= 2*maxHeaderBytes; i++ {
				typ, body := byte(tar.TypeXHeader), paxRecord("comment", strings.Repeat("c", 900<<10))
				if i%3 == 2 {
					typ, body = tar.TypeGNULongName, strings.Repeat("n", 900<<10)
				}
				data = append(data, sealHeader(rawHeader("././@Ext", typ, int64(len(body)), false))...)
				data = append(data, pad512([]byte(body))...)
			}
			c := sparseCase{form: form, size: 1 << 20, regions: []dataRegion{{4096, 5}, {1 << 19, 3}}, data: []byte("helloabc")}
			data = append(data, sparseTarOf(c)...)
			native := t.TempDir()
			if _, err := archive.Apply(context.Background(), native, bytes.NewReader(data)); err != nil {
				t.Fatalf("containerd: %v", err)
			}
			layer := filepath.Join(t.TempDir(), "fs")
			if err := os.Mkdir(layer, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := Apply(context.Background(), layer, bytes.NewReader(data), Options{}); err != nil {
				t.Fatalf("%d bytes of headers before a sparse entry: %v", len(data), err)
			}
			expectSparse(t, filepath.Join(layer, "f"), c)
			if d := testutil.TreeDiff(tree(t, native), tree(t, layer)); len(d) > 0 {
				t.Errorf("tree differs from containerd's:\n%s", strings.Join(d, "\n"))
			}
		})
	}
}

// TestSparseTinyRegionsGathered: regions that share or touch a file block
// are written together (a map of a few bytes per region costs a write per
// buffer, not per region); regions a whole block apart are not, so no hole
// is filled. The tree is containerd's either way.
func TestSparseTinyRegionsGathered(t *testing.T) {
	testutil.RequireRoot(t)
	for _, tc := range []struct {
		name   string
		stride int64
		want   int64 // content calls: writes and the truncate
	}{
		{"every-2-bytes", 2, 2},
		{"one-per-block", fileBlock, 9}, // 8 MiB through the 1 MiB buffer
		{"a-block-apart", 2 * fileBlock, 2001},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := sparseCase{form: form10}
			for i := int64(0); i < 2000; i++ {
				c.regions = append(c.regions, dataRegion{i*tc.stride + tc.stride/2, 1})
				c.data = append(c.data, byte('a'+i%26))
			}
			c.size = 2000*tc.stride + 7
			data := sparseTarOf(c)
			layer := filepath.Join(t.TempDir(), "fs")
			if err := os.Mkdir(layer, 0o755); err != nil {
				t.Fatal(err)
			}
			ops0 := dataOps.Load()
			if err := Apply(context.Background(), layer, bytes.NewReader(data), Options{}); err != nil {
				t.Fatal(err)
			}
			if ops := dataOps.Load() - ops0; ops != tc.want {
				t.Errorf("%d content calls for 2000 regions %d bytes apart, want %d", ops, tc.stride, tc.want)
			}
			expectSparse(t, filepath.Join(layer, "f"), c)
			native := t.TempDir()
			if _, err := archive.Apply(context.Background(), native, bytes.NewReader(data)); err != nil {
				t.Fatalf("containerd: %v", err)
			}
			if d := testutil.TreeDiff(tree(t, native), tree(t, layer)); len(d) > 0 {
				t.Errorf("tree differs from containerd's:\n%s", strings.Join(d, "\n"))
			}
		})
	}
}
