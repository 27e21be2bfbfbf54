package relay

import (
	"sync"

	"golang.org/x/sys/unix"
)

// pipeSize is the capacity asked for each splice pipe. A pipe only
// holds kernel pages while data sits in it, so a large capacity costs
// nothing on idle connections and lets one splice(2) move up to this
// much per call.
var pipeSize = 1 << 20

// maxFreePipes bounds the pipes kept for reuse. Only directions that are
// moving bytes hold a pipe, so a small pool covers the concurrently
// active ones; pipes beyond it are closed.
const maxFreePipes = 32

// pipe is a splice buffer: bytes go in at w and come out at r.
type pipe struct {
	r, w int
	size int // capacity in bytes, as granted by the kernel
}

// pipePool is a bounded free list. sync.Pool is not used because it drops
// items at GC without closing them, which would leak descriptors.
type pipePool struct {
	mu   sync.Mutex
	free []*pipe
}

var pipes pipePool

// newPipe is replaced in tests to simulate descriptor exhaustion.
var newPipe = func() (*pipe, error) {
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return nil, err
	}
	p := &pipe{r: fds[0], w: fds[1], size: 1 << 16}
	// Failure (pipe-max-size, per-user limits) leaves the default size.
	if n, err := unix.FcntlInt(uintptr(p.w), unix.F_SETPIPE_SZ, pipeSize); err == nil {
		p.size = n
	} else if n, err := unix.FcntlInt(uintptr(p.w), unix.F_GETPIPE_SZ, 0); err == nil {
		p.size = n
	}
	return p, nil
}

func (pp *pipePool) get() (*pipe, error) {
	pp.mu.Lock()
	if n := len(pp.free); n > 0 {
		p := pp.free[n-1]
		pp.free = pp.free[:n-1]
		pp.mu.Unlock()
		return p, nil
	}
	pp.mu.Unlock()
	return newPipe()
}

// put takes back an empty pipe. A pipe that may still hold bytes must be
// closed instead, or the next user would relay them to the wrong peer.
func (pp *pipePool) put(p *pipe) {
	pp.mu.Lock()
	if len(pp.free) < maxFreePipes {
		pp.free = append(pp.free, p)
		pp.mu.Unlock()
		return
	}
	pp.mu.Unlock()
	p.close()
}

// drain closes every pooled pipe; tests use it to count descriptors.
func (pp *pipePool) drain() {
	pp.mu.Lock()
	free := pp.free
	pp.free = nil
	pp.mu.Unlock()
	for _, p := range free {
		p.close()
	}
}

func (p *pipe) close() {
	unix.Close(p.r)
	unix.Close(p.w)
}
