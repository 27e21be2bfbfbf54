package relay

import (
	"golang.org/x/sys/unix"
)

// pipeSize is the capacity asked for each splice pipe. A pipe only
// holds kernel pages while data sits in it, so a large capacity costs
// nothing on idle connections and lets one splice(2) move up to this
// much per call.
var pipeSize = 1 << 20

// maxFreePipes bounds the pipes each loop keeps for reuse. Only
// directions that are moving bytes hold a pipe, and a loop moves one
// direction at a time, so a few cover the bursts; the rest are closed.
const maxFreePipes = 16

// pipe is a splice buffer: bytes go in at w and come out at r.
type pipe struct {
	r, w int
	size int // capacity in bytes, as granted by the kernel
}

// pipePool is a loop's free list; only its loop touches it.
type pipePool struct {
	free []*pipe
}

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
	if n := len(pp.free); n > 0 {
		p := pp.free[n-1]
		pp.free = pp.free[:n-1]
		return p, nil
	}
	return newPipe()
}

// put takes back an empty pipe. A pipe that may still hold bytes must be
// closed instead, or the next user would relay them to the wrong peer.
func (pp *pipePool) put(p *pipe) {
	if len(pp.free) < maxFreePipes {
		pp.free = append(pp.free, p)
		return
	}
	p.close()
}

// drain closes every pooled pipe.
func (pp *pipePool) drain() {
	for _, p := range pp.free {
		p.close()
	}
	pp.free = nil
}

func (p *pipe) close() {
	unix.Close(p.r)
	unix.Close(p.w)
}
