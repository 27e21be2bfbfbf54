package relay

import (
	"io"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// Bytes moved process-wide by splice(2) and by the read/write fallback
// used while no pipe can be created (descriptor exhaustion). Tests read
// them to prove which path carried a transfer.
var splicedBytes, copiedBytes atomic.Int64

const copyBufSize = 32 << 10

const spliceFlags = unix.SPLICE_F_MOVE | unix.SPLICE_F_NONBLOCK

// direction moves bytes from src to dst. It holds a pipe only while
// bytes move: it takes one when src has data and gives it back as soon
// as src runs dry with the pipe empty.
type direction struct {
	src, dst *endpoint
	other    *direction

	pipe    *pipe
	buf     []byte // fallback while no pipe can be made
	pending int    // bytes read from src, not yet written to dst
	off     int    // start of pending bytes in buf

	eof     bool // src reached EOF
	done    bool // EOF passed on to dst
	first   bool // done before the other direction
	spliced int64
	copied  int64
}

func (d *direction) reset(eof bool) {
	d.pending, d.off = 0, 0
	d.eof, d.done, d.first = eof, false, false
	d.spliced, d.copied = 0, 0
}

// move relays until src or dst would block, src ends, or about budget
// bytes have moved; it reports whether the budget ran out with more to
// do. On a socket error it ends the whole connection.
func (d *direction) move(budget int64) (more bool) {
	c := d.src.conn
	moved := int64(0)
	for {
		if d.pending > 0 {
			if !d.dst.writable {
				return false
			}
			n, err := d.flush()
			switch {
			case err == unix.EINTR:
				continue
			case err == unix.EAGAIN:
				d.dst.writable = false
				return false
			case err != nil:
				c.fail(d.dst.side, err)
				return false
			}
			moved += int64(n)
			continue
		}
		if d.eof {
			d.release(c.l)
			d.done = true
			d.first = !d.other.done
			if d.first {
				// Pass the EOF on; the other direction goes on. An error
				// here means dst failed, which that direction will see.
				rawShutdownWrite(d.dst.fd)
			}
			return false
		}
		if !d.src.readable {
			d.release(c.l)
			return false
		}
		if moved >= budget {
			return true
		}
		n, err := d.fill(c.l)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			d.src.readable = false
			d.release(c.l)
			return false
		case err != nil:
			c.fail(d.src.side, err)
			return false
		case n == 0:
			d.eof = true
		}
	}
}

// fill reads one chunk from src into the pipe (or buffer).
func (d *direction) fill(l *loop) (int, error) {
	if d.pipe == nil && d.buf == nil {
		if p, err := l.pipes.get(); err == nil {
			d.pipe = p
		} else {
			d.buf = make([]byte, copyBufSize)
		}
	}
	var n int
	var err error
	if d.pipe != nil {
		n, err = rawSplice(d.src.fd, d.pipe.w, d.pipe.size)
	} else {
		n, err = rawRead(d.src.fd, d.buf)
	}
	if err == nil {
		d.pending, d.off = n, 0
	}
	return n, err
}

// flush writes pending bytes to dst once.
func (d *direction) flush() (int, error) {
	var n int
	var err error
	if d.pipe != nil {
		n, err = rawSplice(d.pipe.r, d.dst.fd, d.pending)
	} else {
		n, err = rawWrite(d.dst.fd, d.buf[d.off:d.off+d.pending])
	}
	if err != nil {
		return 0, err
	}
	if n <= 0 {
		return 0, io.ErrNoProgress
	}
	d.pending -= n
	d.off += n
	if d.pipe != nil {
		d.spliced += int64(n)
	} else {
		d.copied += int64(n)
	}
	return n, nil
}

// release returns the pipe or buffer once it holds no pending bytes.
func (d *direction) release(l *loop) {
	if d.pending != 0 {
		return
	}
	if d.pipe != nil {
		l.pipes.put(d.pipe)
		d.pipe = nil
	}
	d.buf = nil
}

// finish drops what the direction holds and returns the bytes it moved.
func (d *direction) finish(pp *pipePool) int64 {
	if d.pipe != nil && d.pending != 0 {
		// Undeliverable bytes stay in the pipe: it cannot be reused.
		d.pipe.close()
		d.pipe = nil
	}
	if d.pipe != nil {
		pp.put(d.pipe)
		d.pipe = nil
	}
	d.pending, d.buf = 0, nil
	splicedBytes.Add(d.spliced)
	copiedBytes.Add(d.copied)
	return d.spliced + d.copied
}
