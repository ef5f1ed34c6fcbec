package layer

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync/atomic"

	"github.com/containerd/errdefs"
)

// Sparse tar entries (GNU's PAX formats 0.0, 0.1 and 1.0) declare an
// apparent size and a map of the data regions; the tar holds only the data.
// archive/tar (Go 1.26, reader.go) reads such an entry as its apparent
// content, zeros for the holes, and exposes neither the map of format 1.0
// (it is read from the data before Next returns) nor a way to skip a hole:
// a 7 KB tar declaring 1 TiB costs 1 TiB of zeros made and compared. So
// the layer's tar goes through a tap: the tar reader parses every header
// as usual, the tap keeps the bytes it read for them, and for a sparse
// entry the map and the size of the data are read from those bytes, which
// must be whole blocks ending with the entry's own header (and for 1.0 the
// exact blocks of the map): were a later Go to read ahead, the entry would
// be refused, never misread. The data regions are then
// read raw from the stream and written where the map puts them; the holes
// cost nothing (the file gets its size from ftruncate). The tar reader,
// when it moves on, skips the data it thinks is unread: the tap hands it
// the bytes already taken instead of reading the stream again.
//
// containerd v2.4.2's extraction (pkg/archive/tar.go, createTarFile) takes
// the same PAX sparse entries through the same reader and writes the zeros
// out; the tree is the same (size and content), ours keeps the holes. Old
// GNU sparse entries (type 'S') containerd refuses ("unhandled tar header
// type"), and so does Apply.

// maxHeaderBytes bounds what the tap keeps of the headers before one entry
// (PAX records, long names, a sparse map: archive/tar allows 1 MiB each).
const maxHeaderBytes = 4 << 20

// dataOps counts the system calls made to write and size files' content
// (writes and truncates) and to find and copy their data (seeks, copies).
// Tests bound a sparse entry's cost by it.
var dataOps atomic.Int64

// tarTap is the reader under the tar reader. It counts the stream offset,
// keeps the bytes read while a header is being parsed, and lets a sparse
// entry's data be read past the tar reader.
type tarTap struct {
	r   io.Reader
	off int64 // stream offset of the next byte from r
	// taken counts data bytes read raw that the tar reader has not yet
	// skipped: its next reads (the skip of the entry's data) get these.
	taken     int64
	recording bool
	recFrom   int64 // stream offset of rec[0]
	rec       []byte
	overflow  bool
}

func (t *tarTap) Read(p []byte) (int, error) {
	if t.taken > 0 {
		// Only the tar reader's skip of a sparse entry's data comes here
		// (it skips exactly what was taken, see entryReader.next): the
		// bytes are thrown away, their content does not matter.
		n := int(min(int64(len(p)), t.taken))
		t.taken -= int64(n)
		return n, nil
	}
	n, err := t.r.Read(p)
	t.off += int64(n)
	if t.recording && n > 0 {
		if len(t.rec)+n > maxHeaderBytes {
			t.dropParsed()
		}
		if len(t.rec)+n > maxHeaderBytes {
			t.overflow = true
		} else {
			t.rec = append(t.rec, p[:n]...)
		}
	}
	return n, err
}

// padding is the number of bytes rec starts with that pad the entry
// before to a whole block.
func (t *tarTap) padding() int {
	return int((blockSize - t.recFrom%blockSize) % blockSize)
}

// dropParsed removes from rec the whole PAX and GNU long-name headers (and
// their data) at its start, after the padding. The tar reader has parsed
// them, and the raw bytes a sparse entry needs are its own header and map,
// which come after them. Without this a run of such headers, each of them
// replacing the one before and each within archive/tar's 1 MiB, would
// overflow maxHeaderBytes where containerd reads the entry fine.
func (t *tarTap) dropParsed() {
	pad := t.padding()
	if pad > len(t.rec) {
		return
	}
	blocks := t.rec[pad:]
	i := 0
	for i+blockSize <= len(blocks) {
		n, ext, err := extensionSize(blocks[i : i+blockSize])
		if !ext || err != nil || n > int64(len(blocks)) {
			break
		}
		next := int64(i) + extent(n)
		if next > int64(len(blocks)) {
			break // not read to its end yet
		}
		i = int(next)
	}
	// The bytes dropped are whole blocks: the padding in front stays right.
	t.rec = append(t.rec[:pad], blocks[i:]...)
}

// extensionSize reports whether b, a header block, is a PAX or GNU
// long-name header (ext) and then the size of its data.
func extensionSize(b []byte) (n int64, ext bool, err error) {
	switch b[156] {
	case tar.TypeXHeader, tar.TypeGNULongName, tar.TypeGNULongLink:
		n, err = parseNumeric(b[124:136])
		if err == nil && n < 0 {
			err = fmt.Errorf("negative size %d", n)
		}
		return n, true, err
	}
	return 0, false, nil
}

// extent is the stream length of a header whose data is n bytes: the
// header block and the data padded to whole blocks.
func extent(n int64) int64 {
	return blockSize + (n+blockSize-1)/blockSize*blockSize
}

// readRaw reads data of the current sparse entry straight from the stream.
func (t *tarTap) readRaw(p []byte) (int, error) {
	n, err := io.ReadFull(t.r, p)
	t.off += int64(n)
	t.taken += int64(n)
	if errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

// entryReader reads a layer tar entry by entry; a sparse entry's content
// comes as a *sparseData, any other as the tar reader.
type entryReader struct {
	tap  *tarTap
	tr   *tar.Reader
	cur  io.Reader // the current entry's content
	skip []byte    // a buffer for sparse data nobody wrote
}

func newEntryReader(r io.Reader) *entryReader {
	tap := &tarTap{r: r}
	return &entryReader{tap: tap, tr: tar.NewReader(tap)}
}

// next returns the next entry and its content reader; io.EOF at the end.
func (er *entryReader) next() (*tar.Header, io.Reader, error) {
	// What is left of the current entry is read here, so that what the
	// tap records below starts at the padding before the next header.
	if err := er.finishEntry(); err != nil {
		return nil, nil, err
	}
	t := er.tap
	t.recording, t.rec, t.recFrom, t.overflow = true, t.rec[:0], t.off, false
	hdr, err := er.tr.Next()
	t.recording = false
	if err != nil {
		if errors.Is(err, tar.ErrHeader) || strings.HasPrefix(err.Error(), "archive/tar: ") {
			err = fmt.Errorf("%w: %w", err, errdefs.ErrInvalidArgument)
		}
		return nil, nil, err
	}
	if hdr.Typeflag == tar.TypeGNUSparse {
		return nil, nil, fmt.Errorf("entry %q is an old GNU sparse file (type 'S'), which containerd refuses too; write it as a regular file or with PAX sparse headers (GNU tar --format=posix): %w",
			hdr.Name, errdefs.ErrInvalidArgument)
	}
	er.cur = er.tr
	major, minor := hdr.PAXRecords["GNU.sparse.major"], hdr.PAXRecords["GNU.sparse.minor"]
	form := sparseForm(major, minor, hdr.PAXRecords["GNU.sparse.map"] != "")
	// Go returns a global header's records as they are and never reads
	// them as a sparse map (nor applies them to later entries); neither
	// does containerd.
	if form == 0 || hdr.Typeflag == tar.TypeXGlobalHeader {
		return hdr, er.tr, nil
	}
	sd, err := er.sparseEntry(hdr, form)
	if err != nil {
		return nil, nil, fmt.Errorf("sparse entry %q: %w", hdr.Name, err)
	}
	er.cur = sd
	return hdr, sd, nil
}

// finishEntry reads the rest of the current entry.
func (er *entryReader) finishEntry() error {
	switch r := er.cur.(type) {
	case nil:
		return nil
	case *sparseData:
		if er.skip == nil {
			er.skip = make([]byte, 64<<10)
		}
		return r.discard(er.skip)
	default:
		_, err := io.Copy(io.Discard, r)
		return err
	}
}

// Sparse forms, as archive/tar's readGNUSparsePAXHeaders tells them apart:
// 0.0 and 0.1 keep the map in PAX records, 1.0 at the start of the data.
const (
	sparseNone = iota
	sparse0x
	sparse1x0
)

func sparseForm(major, minor string, hasMap bool) int {
	switch {
	case major == "0" && (minor == "0" || minor == "1"):
		return sparse0x
	case major == "1" && minor == "0":
		return sparse1x0
	case major != "" || minor != "":
		return sparseNone // unknown version: archive/tar reads a plain file
	case hasMap:
		return sparse0x
	}
	return sparseNone
}

// dataRegion is one data region of a sparse file.
type dataRegion struct{ off, len int64 }

// sparseEntry reads the map and data size of the sparse entry hdr from the
// header bytes the tap kept.
func (er *entryReader) sparseEntry(hdr *tar.Header, form int) (*sparseData, error) {
	t := er.tap
	if t.overflow {
		return nil, fmt.Errorf("headers longer than %d bytes: %w", maxHeaderBytes, errdefs.ErrInvalidArgument)
	}
	// The tar reader read the padding of the previous entry first, then
	// whole blocks: headers, and for 1.0 the map.
	pad := t.padding()
	if pad > len(t.rec) || (len(t.rec)-pad)%blockSize != 0 {
		return nil, fmt.Errorf("headers are not whole tar blocks: %w", errdefs.ErrInvalidArgument)
	}
	blocks := t.rec[pad:]
	h, err := entryHeaderAt(blocks)
	if err != nil {
		return nil, err
	}
	if typ := blocks[h+156]; typ != hdr.Typeflag && (typ != tar.TypeRegA || hdr.Typeflag != tar.TypeReg) { //nolint:staticcheck // the reader turns old '\x00' entries into TypeReg
		return nil, fmt.Errorf("the header bytes read end with a %q entry, the tar reader gave %q: %w", typ, hdr.Typeflag, errdefs.ErrInvalidArgument)
	}
	physical, err := physicalSize(hdr, blocks[h:h+blockSize])
	if err != nil {
		return nil, err
	}
	mapBlocks := blocks[h+blockSize:]
	var regions []dataRegion
	if form == sparse1x0 {
		var used int
		regions, used, err = parseMap1x0(mapBlocks)
		if err != nil {
			return nil, err
		}
		if used != len(mapBlocks) {
			return nil, fmt.Errorf("sparse map takes %d bytes, the tar reader read %d: %w", used, len(mapBlocks), errdefs.ErrInvalidArgument)
		}
		physical -= int64(used)
	} else {
		if len(mapBlocks) != 0 {
			return nil, fmt.Errorf("%d bytes after the header of a PAX-mapped sparse file: %w", len(mapBlocks), errdefs.ErrInvalidArgument)
		}
		regions, err = parseMap0x(hdr.PAXRecords["GNU.sparse.numblocks"], hdr.PAXRecords["GNU.sparse.map"])
		if err != nil {
			return nil, err
		}
	}
	data, err := checkRegions(regions, hdr.Size)
	if err != nil {
		return nil, err
	}
	if data != physical {
		return nil, fmt.Errorf("sparse map declares %d bytes of data, the entry holds %d: %w", data, physical, errdefs.ErrInvalidArgument)
	}
	return &sparseData{tap: t, size: hdr.Size, regions: compactRegions(regions), left: data}, nil
}

const blockSize = 512

// entryHeaderAt returns the offset in blocks of the entry's own header:
// after the PAX records and GNU long names that precede it.
func entryHeaderAt(blocks []byte) (int, error) {
	i := 0
	for {
		if i+blockSize > len(blocks) {
			return 0, fmt.Errorf("no entry header among the %d header bytes: %w", len(blocks), errdefs.ErrInvalidArgument)
		}
		b := blocks[i : i+blockSize]
		n, ext, err := extensionSize(b)
		if !ext {
			return i, nil
		}
		if err != nil || n > int64(len(blocks)) {
			return 0, fmt.Errorf("bad size in a %q header: %w", b[156], errdefs.ErrInvalidArgument)
		}
		i += int(extent(n))
	}
}

// physicalSize is the size of the entry's data in the tar (map included
// for 1.0): the PAX size record, or the header's size field.
func physicalSize(hdr *tar.Header, block []byte) (int64, error) {
	if s, ok := hdr.PAXRecords["size"]; ok {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil || n < 0 {
			return 0, fmt.Errorf("bad PAX size %q: %w", s, errdefs.ErrInvalidArgument)
		}
		return n, nil
	}
	n, err := parseNumeric(block[124:136])
	if err != nil || n < 0 {
		return 0, fmt.Errorf("bad size field in the header: %w", errdefs.ErrInvalidArgument)
	}
	return n, nil
}

// parseNumeric reads a tar number field: octal text (spaces and NULs
// around it, cut at a NUL), or base-256 when the top bit is set, as
// archive/tar's parser.parseNumeric reads it.
func parseNumeric(b []byte) (int64, error) {
	if len(b) > 0 && b[0]&0x80 != 0 {
		if b[0]&0x40 != 0 {
			return 0, errors.New("negative number")
		}
		var x uint64
		for i, c := range b {
			if i == 0 {
				c &= 0x7f
			}
			if x>>56 > 0 {
				return 0, errors.New("number overflows")
			}
			x = x<<8 | uint64(c)
		}
		if x>>63 > 0 {
			return 0, errors.New("number overflows")
		}
		return int64(x), nil
	}
	b = bytes.Trim(b, " \x00")
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	if len(b) == 0 {
		return 0, nil
	}
	x, err := strconv.ParseUint(string(b), 8, 63)
	return int64(x), err
}

// parseMap1x0 reads a 1.0 map ("count\n" then "offset\nlength\n" per
// region, in decimal, padded to a block) and returns how many bytes of
// whole blocks it takes.
func parseMap1x0(b []byte) ([]dataRegion, int, error) {
	pos := 0
	token := func() (int64, error) {
		i := bytes.IndexByte(b[pos:], '\n')
		if i < 0 {
			return 0, errors.New("map ends early")
		}
		v, err := strconv.ParseInt(string(b[pos:pos+i]), 10, 64)
		pos += i + 1
		return v, err
	}
	n, err := token()
	if err != nil || n < 0 || n > int64(len(b)/2) {
		return nil, 0, fmt.Errorf("bad sparse map count: %w", errdefs.ErrInvalidArgument)
	}
	regions := make([]dataRegion, 0, n)
	for range n {
		off, err1 := token()
		l, err2 := token()
		if err1 != nil || err2 != nil {
			return nil, 0, fmt.Errorf("bad sparse map region %d: %w", len(regions), errdefs.ErrInvalidArgument)
		}
		regions = append(regions, dataRegion{off, l})
	}
	return regions, (pos + blockSize - 1) / blockSize * blockSize, nil
}

// parseMap0x reads a 0.0 or 0.1 map: numblocks and "offset,length,...".
// (archive/tar gathers 0.0's repeated offset and numbytes records into
// GNU.sparse.map.)
func parseMap0x(count, list string) ([]dataRegion, error) {
	n, err := strconv.ParseInt(count, 10, 64)
	if err != nil || n < 0 {
		return nil, fmt.Errorf("bad GNU.sparse.numblocks %.32q: %w", count, errdefs.ErrInvalidArgument)
	}
	var fields []string
	if list != "" {
		fields = strings.Split(list, ",")
	}
	if int64(len(fields)) != 2*n {
		return nil, fmt.Errorf("GNU.sparse.map has %d numbers for %d regions: %w", len(fields), n, errdefs.ErrInvalidArgument)
	}
	regions := make([]dataRegion, 0, n)
	for i := 0; i < len(fields); i += 2 {
		off, err1 := strconv.ParseInt(fields[i], 10, 64)
		l, err2 := strconv.ParseInt(fields[i+1], 10, 64)
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("bad sparse map region %d: %w", i/2, errdefs.ErrInvalidArgument)
		}
		regions = append(regions, dataRegion{off, l})
	}
	return regions, nil
}

// checkRegions refuses a map whose regions are negative, overlap, are out
// of order or reach past size (archive/tar refuses the same), and returns
// the data they hold.
func checkRegions(regions []dataRegion, size int64) (int64, error) {
	if size < 0 {
		return 0, fmt.Errorf("negative size %d: %w", size, errdefs.ErrInvalidArgument)
	}
	var end, data int64
	for i, r := range regions {
		if r.off < 0 || r.len < 0 || r.off > size-r.len || r.off < end {
			return 0, fmt.Errorf("region %d (offset %d, length %d) is negative, overlaps the one before or ends past the size %d: %w",
				i, r.off, r.len, size, errdefs.ErrInvalidArgument)
		}
		end = r.off + r.len
		data += r.len
	}
	return data, nil
}

// compactRegions drops empty regions.
func compactRegions(regions []dataRegion) []dataRegion {
	out := regions[:0]
	for _, r := range regions {
		if r.len > 0 {
			out = append(out, r)
		}
	}
	return out
}

// sparseData is a sparse entry's content: the regions' data, in the
// stream at the tap.
type sparseData struct {
	tap     *tarTap
	size    int64        // the apparent size
	regions []dataRegion // non-empty, in order
	left    int64        // data bytes not yet read
}

var errSparseRead = errors.New("a sparse entry's content is written with writeTo, not read as a stream")

// Read refuses: reading the apparent content would make every hole's zeros.
func (s *sparseData) Read([]byte) (int, error) { return 0, errSparseRead }

// writeTo writes the regions at their offsets in f, a new empty file, and
// gives f its size. The context is checked per chunk of buf.
func (s *sparseData) writeTo(ctx context.Context, f *os.File, buf []byte) error {
	g := gather{f: f, buf: buf}
	for _, r := range s.regions {
		for done := int64(0); done < r.len; {
			if err := ctx.Err(); err != nil {
				return err
			}
			room, err := g.room(r.off + done)
			if err != nil {
				return err
			}
			n, err := s.tap.readRaw(room[:min(int64(len(room)), r.len-done)])
			s.left -= int64(n)
			if err != nil {
				return fmt.Errorf("read sparse data: %w", err)
			}
			g.n += n
			done += int64(n)
		}
	}
	if err := g.flush(); err != nil {
		return err
	}
	s.regions = nil
	dataOps.Add(1)
	return f.Truncate(s.size)
}

// fileBlock is the allocation unit gather assumes: 4 KiB, the page size
// and the block size of ext4, xfs and tmpfs as made by default.
const fileBlock = 4096

// gather collects the data of regions that share or touch a file block
// into one write: a map of many tiny regions costs a write per buffer, not
// per region. The zeros it writes between two regions lie in blocks their
// data allocates anyway, so no hole is filled.
type gather struct {
	f   *os.File
	buf []byte
	off int64 // file offset of buf[0]
	n   int   // bytes gathered in buf
}

// room returns where the data for file offset at goes: the rest of buf,
// after the zeros up to at, or all of buf once what was gathered is
// written because at is too far from it.
func (g *gather) room(at int64) ([]byte, error) {
	end := g.off + int64(g.n)
	gap := at - end
	touches := at&^(fileBlock-1) <= (end+fileBlock-1)&^(fileBlock-1)
	if g.n > 0 && (gap < 0 || !touches || gap >= int64(len(g.buf)-g.n)) {
		if err := g.flush(); err != nil {
			return nil, err
		}
	}
	if g.n == 0 {
		g.off, gap = at, 0
	}
	clear(g.buf[g.n : g.n+int(gap)])
	g.n += int(gap)
	return g.buf[g.n:], nil
}

// flush writes what was gathered.
func (g *gather) flush() error {
	if g.n == 0 {
		return nil
	}
	dataOps.Add(1)
	_, err := g.f.WriteAt(g.buf[:g.n], g.off)
	g.n = 0
	return err
}

// discard reads the data not yet read.
func (s *sparseData) discard(buf []byte) error {
	for s.left > 0 {
		n, err := s.tap.readRaw(buf[:min(int64(len(buf)), s.left)])
		s.left -= int64(n)
		if err != nil {
			return fmt.Errorf("read sparse data: %w", err)
		}
	}
	return nil
}

// writeData writes an entry's content into f, the new file.
func (w *writer) writeData(f *os.File, r io.Reader) error {
	if s, ok := r.(*sparseData); ok {
		if w.buf == nil {
			w.buf = make([]byte, 1<<20)
		}
		return s.writeTo(w.ctx, f, w.buf)
	}
	return w.writeContent(f, r)
}

// exportChunk is what Export writes between two looks at its context.
const exportChunk = 1 << 20

// zeroChunk is the zeros Export writes for holes.
var zeroChunk = make([]byte, exportChunk)

// exportData writes the first size bytes of f into w: the data regions as
// read, the holes as zeros made here (SEEK_DATA, SEEK_HOLE: a hole is not
// read). The tar keeps a plain entry holding every zero, as containerd's
// archive.WriteDiff (v2.4.2, pkg/archive/tar.go) writes it: the OCI layer
// spec says sparse entries should not be used, as tar implementations
// disagree on them. The context is checked per chunk (buf's length), so a
// cancelled Compare stops within one chunk, holes included.
func exportData(ctx context.Context, w io.Writer, f *os.File, size int64, buf []byte) error {
	var pos int64 // what w has of f
	zeros := func(n int64) error {
		for n > 0 {
			if err := ctx.Err(); err != nil {
				return err
			}
			k := min(n, int64(len(zeroChunk)))
			if _, err := w.Write(zeroChunk[:k]); err != nil {
				return err
			}
			n -= k
		}
		return nil
	}
	err := forData(ctx, f, size, func(off, n int64) error {
		if err := zeros(off - pos); err != nil {
			return err
		}
		for done := int64(0); done < n; {
			if err := ctx.Err(); err != nil {
				return err
			}
			dataOps.Add(1)
			k, err := f.ReadAt(buf[:min(n-done, int64(len(buf)))], off+done)
			if k == 0 && errors.Is(err, io.EOF) {
				return fmt.Errorf("file shrank from %d to %d bytes while being read", size, off+done)
			}
			if err != nil && !errors.Is(err, io.EOF) {
				return err
			}
			if _, err := w.Write(buf[:k]); err != nil {
				return err
			}
			done += int64(k)
		}
		pos = off + n
		return nil
	})
	if err != nil {
		return err
	}
	return zeros(size - pos)
}
