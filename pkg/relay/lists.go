package relay

import "time"

// timerList is a FIFO of connections by deadline. Every connection in
// one list got the same timeout, so appending keeps it sorted.
type timerList struct{ head, tail *Conn }

func (t *timerList) push(c *Conn, deadline time.Time) {
	c.deadline, c.timers = deadline, t
	c.tprev, c.tnext = t.tail, nil
	if t.tail != nil {
		t.tail.tnext = c
	} else {
		t.head = c
	}
	t.tail = c
}

func (t *timerList) remove(c *Conn) {
	if c.timers != t {
		return
	}
	if c.tprev != nil {
		c.tprev.tnext = c.tnext
	} else {
		t.head = c.tnext
	}
	if c.tnext != nil {
		c.tnext.tprev = c.tprev
	} else {
		t.tail = c.tprev
	}
	c.tprev, c.tnext, c.timers = nil, nil, nil
}

func (t *timerList) next() time.Time {
	if t.head == nil {
		return time.Time{}
	}
	return t.head.deadline
}

// connList holds a loop's live connections, for abortAll.
type connList struct{ head *Conn }

func (cl *connList) push(c *Conn) {
	c.lprev, c.lnext = nil, cl.head
	if cl.head != nil {
		cl.head.lprev = c
	}
	cl.head = c
}

func (cl *connList) remove(c *Conn) {
	if c.lprev != nil {
		c.lprev.lnext = c.lnext
	} else {
		cl.head = c.lnext
	}
	if c.lnext != nil {
		c.lnext.lprev = c.lprev
	}
	c.lprev, c.lnext = nil, nil
}
