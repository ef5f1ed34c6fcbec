package differ

import (
	"bytes"
	"errors"
	"io"
	"math/rand"
	"testing"
	"testing/iotest"
)

// TestReadAheadSameBytes reads streams of sizes around the chunk size,
// through readers that return a few bytes at a time, and in reads of odd
// sizes: the bytes and the end are those of the source.
func TestReadAheadSameBytes(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	for _, size := range []int{0, 1, readAheadChunk - 1, readAheadChunk, readAheadChunk + 1, readAheadChunk*readAheadDepth*3 + 7} {
		src := make([]byte, size)
		rng.Read(src)
		for name, r := range map[string]func() io.Reader{
			"whole":    func() io.Reader { return bytes.NewReader(src) },
			"one byte": func() io.Reader { return iotest.OneByteReader(bytes.NewReader(src)) },
			"half":     func() io.Reader { return iotest.HalfReader(bytes.NewReader(src)) },
		} {
			ra := newReadAhead(r())
			got, err := io.ReadAll(iotest.OneByteReader(io.LimitReader(ra, int64(size)+1)))
			if err != nil {
				t.Fatalf("%d bytes, %s: %v", size, name, err)
			}
			if !bytes.Equal(got, src) {
				t.Fatalf("%d bytes, %s: read %d bytes, not the source's", size, name, len(got))
			}
			if n, err := ra.Read(make([]byte, 8)); n != 0 || !errors.Is(err, io.EOF) {
				t.Fatalf("%d bytes, %s: read after the end = %d, %v; want 0, EOF", size, name, n, err)
			}
			_ = ra.Close()
		}
	}
}

// TestReadAheadError hands on the source's error after the data before it.
func TestReadAheadError(t *testing.T) {
	boom := errors.New("boom")
	src := bytes.Repeat([]byte("x"), readAheadChunk+100)
	ra := newReadAhead(io.MultiReader(bytes.NewReader(src), iotest.ErrReader(boom)))
	defer func() { _ = ra.Close() }()
	got, err := io.ReadAll(ra)
	if !errors.Is(err, boom) {
		t.Fatalf("error = %v, want %v", err, boom)
	}
	if !bytes.Equal(got, src) {
		t.Fatalf("read %d bytes before the error, want %d", len(got), len(src))
	}
}

// blockingReader serves data forever, and counts reads that start after
// closed is set.
type blockingReader struct {
	closed     chan struct{}
	lateReads  int
	totalReads int
}

func (b *blockingReader) Read(p []byte) (int, error) {
	select {
	case <-b.closed:
		b.lateReads++
	default:
	}
	b.totalReads++
	return len(p), nil
}

// TestReadAheadClose stops the reader with the stream unfinished (an apply
// that failed): Close returns, the source is not read after it, and a later
// Read fails instead of hanging.
func TestReadAheadClose(t *testing.T) {
	src := &blockingReader{closed: make(chan struct{})}
	ra := newReadAhead(src)
	if _, err := io.ReadFull(ra, make([]byte, 3*readAheadChunk)); err != nil {
		t.Fatal(err)
	}
	_ = ra.Close()
	close(src.closed)
	_ = ra.Close() // twice is harmless
	// What was read ahead may still come out; then an error, not a hang.
	buf := make([]byte, readAheadChunk)
	for i := 0; ; i++ {
		if _, err := ra.Read(buf); err != nil {
			if !errors.Is(err, io.ErrClosedPipe) {
				t.Fatalf("read after Close: %v, want %v", err, io.ErrClosedPipe)
			}
			break
		}
		if i > readAheadDepth+1 {
			t.Fatalf("read after Close returned more than the %d chunks read ahead", readAheadDepth)
		}
	}
	if src.lateReads != 0 {
		t.Fatalf("the source was read %d times after Close returned", src.lateReads)
	}
	if src.totalReads > 3+readAheadDepth+1 {
		t.Fatalf("source read %d times for 3 chunks taken: the read-ahead is not bounded by %d", src.totalReads, readAheadDepth)
	}
}
