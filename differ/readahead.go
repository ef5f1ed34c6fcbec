package differ

import (
	"io"
	"sync"
)

// Read-ahead sizes: up to 1 MiB in flight keeps the reading side busy
// across the pauses of the applying side (a burst of small files) at a
// memory cost that does not depend on the layer. A chunk is what one Read
// returned (a decompressor returns up to its 32 KiB window per Read).
const (
	readAheadChunk = 64 << 10
	readAheadDepth = 16
)

// readAhead reads r in its own goroutine, up to readAheadDepth chunks ahead
// of its reader. Applying a layer is one thread of syscalls; the work behind
// r (decompression, the digest of the uncompressed stream) then runs on
// another core at the same time instead of between them. containerd's own
// appliers read the stream inline.
type readAhead struct {
	full chan chunk
	free chan []byte
	stop chan struct{}
	wg   sync.WaitGroup

	buf []byte // the chunk cur is part of, handed back to fill when used up
	cur []byte
	err error
}

type chunk struct {
	data []byte
	err  error
}

// newReadAhead starts reading r. Close must be called, even after an error.
func newReadAhead(r io.Reader) *readAhead {
	ra := &readAhead{
		full: make(chan chunk, readAheadDepth),
		free: make(chan []byte, readAheadDepth),
		stop: make(chan struct{}),
	}
	for range readAheadDepth {
		ra.free <- make([]byte, readAheadChunk)
	}
	ra.wg.Add(1)
	go ra.fill(r)
	return ra
}

// fill reads r into free buffers until r ends, fails, or Close is called.
func (ra *readAhead) fill(r io.Reader) {
	defer ra.wg.Done()
	for {
		var buf []byte
		select {
		case buf = <-ra.free:
		case <-ra.stop:
			return
		}
		// One Read, not ReadFull: what a stream has now is passed on now. A
		// processor that sends the start of a layer and then stalls must
		// not keep the applier from seeing (and refusing) that start.
		n, err := r.Read(buf)
		if n == 0 && err == nil {
			ra.free <- buf
			continue
		}
		select {
		case ra.full <- chunk{buf[:n], err}:
		case <-ra.stop:
			return
		}
		if err != nil {
			return
		}
	}
}

// Read returns the data read ahead in order, then r's error (io.EOF at
// its end).
func (ra *readAhead) Read(p []byte) (int, error) {
	for len(ra.cur) == 0 {
		if ra.err != nil {
			return 0, ra.err
		}
		ra.next()
	}
	n := copy(p, ra.cur)
	ra.cur = ra.cur[n:]
	return n, nil
}

// next takes the next chunk, handing the one used up back to fill.
func (ra *readAhead) next() {
	if ra.buf != nil {
		ra.free <- ra.buf[:cap(ra.buf)]
		ra.buf = nil
	}
	select {
	case c := <-ra.full:
		ra.buf, ra.cur, ra.err = c.data, c.data, c.err
	case <-ra.stop:
		ra.err = io.ErrClosedPipe
	}
}

// Close stops the reading goroutine and waits for it, so that r is no longer
// read once Close returns (the caller closes r next; closing a decompressor
// during its Read is a race). It waits for at most the one Read in flight:
// a local blob returns promptly, and apply ends a Read on an external
// stream processor first (its context cancelled, its pipe closed).
func (ra *readAhead) Close() error {
	select {
	case <-ra.stop:
	default:
		close(ra.stop)
	}
	ra.wg.Wait()
	return nil
}
