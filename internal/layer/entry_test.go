package layer

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// Raw tar blocks, for what archive/tar cannot write (GNU sparse entries,
// which archive/tar reads but never writes): tartest.Entry.Raw carries them
// into a layer, tartest writing everything else.

func putOctal(b []byte, v int64) {
	copy(b, fmt.Sprintf("%0*o", len(b)-1, v))
	b[len(b)-1] = 0
}

// rawHeader is a ustar header block (GNU magic with gnu set).
func rawHeader(name string, typ byte, size int64, gnu bool) *[512]byte {
	var b [512]byte
	copy(b[0:100], name)
	putOctal(b[100:108], 0o644)
	putOctal(b[108:116], 0)
	putOctal(b[116:124], 0)
	putOctal(b[124:136], size)
	putOctal(b[136:148], testTime.Unix())
	b[156] = typ
	if gnu {
		copy(b[257:265], "ustar  \x00")
	} else {
		copy(b[257:265], "ustar\x0000")
	}
	return &b
}

func sealHeader(b *[512]byte) []byte {
	for i := 148; i < 156; i++ {
		b[i] = ' '
	}
	sum := 0
	for _, c := range b {
		sum += int(c)
	}
	copy(b[148:156], fmt.Sprintf("%06o\x00 ", sum))
	return b[:]
}

func pad512(b []byte) []byte {
	if n := len(b) % 512; n != 0 {
		b = append(b, make([]byte, 512-n)...)
	}
	return b
}

func paxRecord(k, v string) string {
	rec := " " + k + "=" + v + "\n"
	n := len(rec)
	for {
		s := fmt.Sprint(n) + rec
		if len(s) == n {
			return s
		}
		n = len(s)
	}
}

type sparseRegion struct {
	off  int64
	data []byte
}

// sparseTar is a tar holding one sparse file of logical size size whose
// data are regions, in GNU's PAX 1.0 format or the old GNU one.
func sparseTar(name string, size int64, regions []sparseRegion, oldGNU bool) []byte {
	var out, data []byte
	for _, r := range regions {
		data = append(data, r.data...)
	}
	if oldGNU {
		h := rawHeader(name, tar.TypeGNUSparse, int64(len(data)), true)
		for i, r := range regions { // up to 4 in the header itself
			putOctal(h[386+i*24:386+i*24+12], r.off)
			putOctal(h[386+i*24+12:386+i*24+24], int64(len(r.data)))
		}
		putOctal(h[483:495], size)
		out = append(out, sealHeader(h)...)
		out = append(out, pad512(data)...)
	} else {
		recs := paxRecord("GNU.sparse.major", "1") + paxRecord("GNU.sparse.minor", "0") +
			paxRecord("GNU.sparse.name", name) + paxRecord("GNU.sparse.realsize", fmt.Sprint(size))
		out = append(out, sealHeader(rawHeader("./PaxHeaders/"+name, tar.TypeXHeader, int64(len(recs)), false))...)
		out = append(out, pad512([]byte(recs))...)
		sparseMap := fmt.Sprintf("%d\n", len(regions))
		for _, r := range regions {
			sparseMap += fmt.Sprintf("%d\n%d\n", r.off, len(r.data))
		}
		body := append(pad512([]byte(sparseMap)), data...)
		out = append(out, sealHeader(rawHeader("GNUSparseFile.0/"+name, tar.TypeReg, int64(len(body)), false))...)
		out = append(out, pad512(body)...)
	}
	return append(out, make([]byte, 1024)...)
}

// TestSparseEntry: a sparse entry of 256 MiB whose tar is a few KB is
// written sparse (holes stay holes) and reads back right. (Old GNU sparse
// entries are refused: TestSparseOldGNURefused.)
func TestSparseEntry(t *testing.T) {
	testutil.RequireRoot(t)
	const size = 256 << 20
	regions := []sparseRegion{
		{4096, []byte("sixteen bytes!!\n")},
		{128 << 20, []byte("in the middle...")},
		{size - 16, []byte("at the very end\n")},
	}
	for _, format := range []string{"pax1.0"} {
		t.Run(format, func(t *testing.T) {
			data := sparseTar("sparse", size, regions, format == "oldgnu")
			t.Logf("tar of %d bytes", len(data))
			// The tar is what we think it is.
			tr := tar.NewReader(bytes.NewReader(data))
			hdr, err := tr.Next()
			if err != nil || hdr.Name != "sparse" || hdr.Size != size {
				t.Fatalf("hand-made sparse tar reads as %+v, %v", hdr, err)
			}
			for _, detached := range []bool{false, true} {
				dir := t.TempDir()
				layer := filepath.Join(dir, "fs")
				if err := os.Mkdir(layer, 0o755); err != nil {
					t.Fatal(err)
				}
				opts := Options{}
				if detached {
					opts = Options{Detached: true, StateFile: StateFile(dir)}
				}
				if err := Apply(context.Background(), layer, bytes.NewReader(data), opts); err != nil {
					t.Fatalf("detached=%v: %v", detached, err)
				}
				p := filepath.Join(layer, "sparse")
				var st unix.Stat_t
				if err := unix.Stat(p, &st); err != nil {
					t.Fatal(err)
				}
				if st.Size != size {
					t.Errorf("detached=%v: size %d, want %d", detached, st.Size, size)
				}
				if alloc := st.Blocks * 512; alloc >= 1<<20 {
					t.Errorf("detached=%v: %d bytes allocated for %d bytes of data in %d regions, want < 1 MiB: zeros around the data were written", detached, alloc, 48, len(regions))
				}
				checkSparseContent(t, p, size, regions)
			}
		})
	}
}

func checkSparseContent(t *testing.T, p string, size int64, regions []sparseRegion) {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	buf := make([]byte, 1<<20)
	var off int64
	bad := 0
	for off < size {
		n, err := io.ReadFull(f, buf[:min(int64(len(buf)), size-off)])
		if err != nil {
			t.Fatalf("read at %d: %v", off, err)
		}
		for i := 0; i < n; i++ {
			want := byte(0)
			pos := off + int64(i)
			for _, r := range regions {
				if pos >= r.off && pos < r.off+int64(len(r.data)) {
					want = r.data[pos-r.off]
				}
			}
			if buf[i] != want {
				if bad++; bad <= 3 {
					t.Errorf("byte %d is %q, want %q", pos, buf[i], want)
				}
			}
		}
		off += int64(n)
	}
}

// feed is a reader of n bytes made on the fly (nothing held in memory),
// that counts what it delivered and can be cut off.
type feed struct {
	remaining int64
	delivered atomic.Int64
	cut       atomic.Bool
	pattern   []byte
}

var errFeedCut = errors.New("feed cut by the test")

func (f *feed) Read(p []byte) (int, error) {
	if f.cut.Load() {
		return 0, errFeedCut
	}
	if f.remaining == 0 {
		return 0, io.EOF
	}
	n := min(int64(len(p)), f.remaining)
	for i := int64(0); i < n; {
		i += int64(copy(p[i:n], f.pattern))
	}
	f.remaining -= n
	f.delivered.Add(n)
	return int(n), nil
}

// maxReadAfterCancel bounds what Apply may still read of an entry once its
// context is cancelled: the chunk it is copying and what the tar reader has
// buffered, a few MiB, never the rest of the entry.
const maxReadAfterCancel = 8 << 20

// TestCancelInsideEntry: cancelling the context while one big entry (2 GiB,
// streamed) is being copied makes Apply return context.Canceled after at
// most one more chunk, not at the end of the entry. It counts bytes, not
// time, so a loaded machine cannot make it fail.
func TestCancelInsideEntry(t *testing.T) {
	testutil.RequireRoot(t)
	const size = 2 << 30
	var hb bytes.Buffer
	// Only the header is written here: tartest writes whole entries, and
	// this one's 2 GiB body is streamed by the feed below.
	tw := tar.NewWriter(&hb)
	if err := tw.WriteHeader(&tar.Header{Name: "big", Typeflag: tar.TypeReg, Mode: 0o644, Size: size, ModTime: testTime}); err != nil {
		t.Fatal(err)
	}
	// The header is written; the entry's data follows from the feed.
	body := &feed{remaining: size, pattern: bytes.Repeat([]byte("0123456789abcdef"), 4096)}
	r := io.MultiReader(bytes.NewReader(hb.Bytes()), body, bytes.NewReader(make([]byte, 1024)))
	layer := filepath.Join(t.TempDir(), "fs")
	if err := os.Mkdir(layer, 0o755); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- Apply(ctx, layer, r, Options{}) }()
	// Wait for the copy to be well inside the entry: the feed counts what
	// Apply has read, so this waits on Apply's progress, not on a clock.
	for body.delivered.Load() < 64<<20 {
		select {
		case err := <-done:
			t.Fatalf("Apply returned before the cancel: %v", err)
		default:
			runtime.Gosched()
		}
	}
	cancel()
	atCancel := body.delivered.Load()
	// No timer: an Apply that ignores the cancel reads the whole entry and
	// fails the checks below; one that hangs is caught by the test timeout.
	err := <-done
	after := body.delivered.Load() - atCancel
	t.Logf("read %d KiB after the cancel, %d MiB of %d in all", after>>10, body.delivered.Load()>>20, size>>20)
	if !errors.Is(err, context.Canceled) {
		t.Errorf("Apply returned %v, want context.Canceled", err)
	}
	if after > maxReadAfterCancel {
		t.Errorf("Apply read %d bytes of the entry after the cancel, want at most %d (one copy chunk and the reader's buffer)", after, maxReadAfterCancel)
	}
}

// hostileXattrs are overlay markers a layer must not be able to set on its
// files: fuse-overlayfs (user.fuseoverlayfs.*), the kernel's overlayfs
// (trusted.overlay.*, and user.overlay.* with userxattr) would take them
// for their own.
var hostileXattrs = map[string]string{
	"trusted.overlay.opaque":           "y",
	"trusted.overlay.redirect":         "/x",
	"user.fuseoverlayfs.opaque":        "y",
	"user.fuseoverlayfs.override_stat": "0:0:04755",
	"user.fuseoverlayfs.origin":        "x",
	"user.overlay.opaque":              "y",
	"user.overlay.redirect":            "/x",
	"user.overlay.whiteout":            "y",
}

func isHostileXattr(name string) bool {
	for _, p := range []string{"trusted.overlay.", "user.fuseoverlayfs.", "user.overlay."} {
		if strings.HasPrefix(name, p) {
			return true
		}
	}
	return false
}

// TestHostileXattrsDropped: overlay markers in tar headers end up on no
// file of any layer, while ordinary user.* xattrs stay.
func TestHostileXattrsDropped(t *testing.T) {
	testutil.RequireRoot(t)
	all := map[string]string{"user.foo": "bar"}
	for k, v := range hostileXattrs {
		all[k] = v
	}
	with := func(e ent) ent { e.xattrs = all; return e }
	layers := [][]ent{
		{dir("d"), file("d/x", "x"), dir("e"), file("e/y", "y"), with(dir("base")), with(file("base/f", "f"))},
		{with(dir("d")), with(file("d/f", "f")), with(file("f", "f")), with(dir("e")), with(dir("n")), with(file("n/g", "g")),
			with(hardlink("h", "d/x")), with(symlink("s", "d")), with(ent{name: "fifo", typ: tar.TypeFifo, mode: 0o644})},
	}
	// Where user.foo must be (regular files and directories can have it).
	wantFoo := map[int][]string{0: {"base", "base/f"}, 1: {"d", "d/f", "f", "e", "n", "n/g", "h"}}
	forms := map[string]Forms{"privileged": ProbeForms(t.TempDir()), "fallback": FallbackForms}
	for fname, f := range forms {
		for _, detached := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/detached=%v", fname, detached), func(t *testing.T) {
				// Not applyOurs: a refused entry is reported, and the
				// layers checked all the same (a marker that took effect
				// can hide the lower file a later hard link names).
				s := newStack(t, len(layers))
				ctx := context.Background()
				for i, l := range layers {
					opts := Options{Forms: &f, Lowers: s.lowers(i)}
					if detached {
						opts = Options{Forms: &f, Detached: true, StateFile: s.state(i)}
					}
					err := Apply(ctx, s.dirs[i], bytes.NewReader(tarOf(t, l...)), opts)
					if err == nil && detached {
						err = Finish(ctx, s.dirs[i], s.state(i), s.lowers(i))
					}
					if err != nil {
						t.Errorf("layer %d: %v", i, err)
					}
				}
				for i, d := range s.dirs {
					err := filepath.WalkDir(d, func(p string, _ os.DirEntry, err error) error {
						if err != nil {
							return err
						}
						names, err := listXattrs(p)
						if err != nil {
							return err
						}
						for _, n := range names {
							if isHostileXattr(n) {
								v, _ := getXattr(p, n)
								rel, _ := filepath.Rel(d, p)
								t.Errorf("layer %d: %s carries %s=%q from the tar", i, rel, n, v)
							}
						}
						return nil
					})
					if err != nil {
						t.Fatal(err)
					}
					for _, rel := range wantFoo[i] {
						if v, err := getXattr(filepath.Join(d, rel), "user.foo"); err != nil || string(v) != "bar" {
							t.Errorf("layer %d: %s: user.foo = %q, %v; want bar", i, rel, v, err)
						}
					}
				}
			})
		}
	}
}

// hardLinkTar is a layer of a few files, n hard links to them spread over
// 16 directories, and n/10 hard links to lower/f (a file of the layer
// below). One target per 32k links: ext4 allows 65,000 links to an inode.
func hardLinkTar(b *testing.B, n int) ([]byte, int) {
	b.Helper()
	var l []ent
	for d := 0; d < 16; d++ {
		l = append(l, dir(fmt.Sprintf("d%d", d)))
	}
	targets := (n + 32767) / 32768
	for i := 0; i < targets; i++ {
		l = append(l, file(fmt.Sprintf("d0/target%d", i), "data"))
	}
	links := 0
	for i := 0; i < n; i++ {
		l = append(l, hardlink(fmt.Sprintf("d%d/l%d", i%16, i), fmt.Sprintf("d0/target%d", i%targets)))
		links++
	}
	for i := 0; i < n/10; i++ {
		l = append(l, hardlink(fmt.Sprintf("d%d/low%d", i%16, i), "lower/f"))
		links++
	}
	return tarBytes(b, l), links
}

// BenchmarkHardLinks applies a layer of many hard links (to a file of the
// layer and to a file of the layer below), sequentially and detached then
// finished, and reports the time per link.
func BenchmarkHardLinks(b *testing.B) {
	testutil.RequireRoot(b)
	ctx := context.Background()
	for _, n := range []int{50_000, 100_000, 200_000} {
		data, links := hardLinkTar(b, n)
		base := b.TempDir()
		lower := filepath.Join(base, "lower", "fs")
		if err := os.MkdirAll(lower, 0o755); err != nil {
			b.Fatal(err)
		}
		ltar := tarOf(b, dir("lower"), file("lower/f", "lower file"))
		if err := Apply(ctx, lower, bytes.NewReader(ltar), Options{}); err != nil {
			b.Fatal(err)
		}
		for _, mode := range []string{"sequential", "detached"} {
			b.Run(fmt.Sprintf("%dk/%s", n/1000, mode), func(b *testing.B) {
				for i := 0; i < b.N; i++ {
					b.StopTimer()
					snap, err := os.MkdirTemp(base, "upper-")
					if err != nil {
						b.Fatal(err)
					}
					upper := filepath.Join(snap, "fs")
					if err := os.Mkdir(upper, 0o755); err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
					if mode == "sequential" {
						err = Apply(ctx, upper, bytes.NewReader(data), Options{Lowers: []string{lower}})
					} else {
						err = Apply(ctx, upper, bytes.NewReader(data), Options{Detached: true, StateFile: StateFile(snap)})
						if err == nil {
							err = Finish(ctx, upper, StateFile(snap), []string{lower})
						}
					}
					b.StopTimer()
					if err != nil {
						b.Fatal(err)
					}
					if err := os.RemoveAll(snap); err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
				}
				b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*links), "ns/link")
			})
		}
	}
}
