package relay

import (
	"io"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

// Bytes moved process-wide by splice(2) and by the read/write fallback
// used while no pipe can be created (descriptor exhaustion). Tests read
// them to prove which path carried a transfer.
var splicedBytes, copiedBytes atomic.Int64

const copyBufSize = 32 << 10

var copyBufs = sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}

const spliceFlags = unix.SPLICE_F_MOVE | unix.SPLICE_F_NONBLOCK

// direction moves bytes from src to dst until src reaches EOF or either
// side fails. It waits in Go's netpoller through RawConn callbacks, so
// a parked direction holds no pipe and no buffer: it takes a pipe only
// once src has data and gives it back as soon as src runs dry with the
// pipe empty.
type direction struct {
	src, dst syscall.RawConn

	pipe *pipe   // held only while bytes move
	buf  *[]byte // fallback buffer, held instead of pipe when none can be made

	pending int   // bytes read from src, not yet written to dst
	off     int   // start of pending bytes in buf
	err     error // syscall error seen by the last callback

	spliced, copied int64

	// Bound once so the hot loop does not allocate a closure per call.
	fillFn, flushFn func(fd uintptr) bool
}

func newDirection(src, dst syscall.RawConn) *direction {
	d := &direction{src: src, dst: dst}
	d.fillFn = d.fill
	d.flushFn = d.flush
	return d
}

// run relays until EOF on src (both errors nil) or a failure, reported
// as readErr (src side) or writeErr (dst side).
func (d *direction) run() (readErr, writeErr error) {
	defer d.finish()
	for {
		d.err = nil
		if err := d.src.Read(d.fillFn); err != nil {
			return err, nil
		}
		if d.err != nil {
			return d.err, nil
		}
		if d.pending == 0 {
			return nil, nil // EOF
		}
		if err := d.dst.Write(d.flushFn); err != nil {
			return nil, err
		}
		if d.err != nil {
			return nil, d.err
		}
	}
}

// fill reads one chunk from src. It returns false (park until readable)
// on EAGAIN after handing the empty pipe back.
func (d *direction) fill(fd uintptr) bool {
	if d.pipe == nil && d.buf == nil {
		if p, err := pipes.get(); err == nil {
			d.pipe = p
		} else {
			d.buf = copyBufs.Get().(*[]byte)
		}
	}
	for {
		var n int
		var err error
		if d.pipe != nil {
			var m int64
			m, err = unix.Splice(int(fd), nil, d.pipe.w, nil, d.pipe.size, spliceFlags)
			n = int(m)
		} else {
			n, err = unix.Read(int(fd), *d.buf)
		}
		switch err {
		case nil:
			d.pending, d.off = n, 0
			return true
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			d.release()
			return false
		default:
			d.err = err
			return true
		}
	}
}

// flush writes all pending bytes to dst, returning false (park until
// writable) when dst's send buffer is full: a slow reader makes us wait,
// not spin.
func (d *direction) flush(fd uintptr) bool {
	for d.pending > 0 {
		var n int
		var err error
		if d.pipe != nil {
			var m int64
			m, err = unix.Splice(d.pipe.r, nil, int(fd), nil, d.pending, spliceFlags)
			n = int(m)
		} else {
			n, err = unix.Write(int(fd), (*d.buf)[d.off:d.off+d.pending])
		}
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return false
		case err != nil:
			d.err = err
			return true
		case n <= 0:
			d.err = io.ErrNoProgress
			return true
		}
		d.pending -= n
		d.off += n
		if d.pipe != nil {
			d.spliced += int64(n)
		} else {
			d.copied += int64(n)
		}
	}
	return true
}

// release returns the pipe or buffer once it holds no pending bytes.
func (d *direction) release() {
	if d.pending != 0 {
		return
	}
	if d.pipe != nil {
		pipes.put(d.pipe)
		d.pipe = nil
	}
	if d.buf != nil {
		copyBufs.Put(d.buf)
		d.buf = nil
	}
}

func (d *direction) finish() {
	if d.pipe != nil && d.pending != 0 {
		// Undeliverable bytes stay in the pipe: it cannot be reused.
		d.pipe.close()
		d.pipe = nil
		d.pending = 0
	}
	d.pending = 0
	d.release()
	splicedBytes.Add(d.spliced)
	copiedBytes.Add(d.copied)
}

func (d *direction) bytes() int64 { return d.spliced + d.copied }
