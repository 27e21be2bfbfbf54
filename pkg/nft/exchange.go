package nft

import (
	"errors"
	"fmt"
	"time"

	"github.com/mdlayher/netlink"
)

// nlConn is what the backend needs of a netlink connection; *netlink.Conn
// (real, or nltest's in unit tests) implements it.
type nlConn interface {
	SendMessages([]netlink.Message) ([]netlink.Message, error)
	Receive() ([]netlink.Message, error)
	Execute(netlink.Message) ([]netlink.Message, error)
	SetReadDeadline(time.Time) error
	Close() error
}

// replyTimeout bounds how long we wait for the kernel to answer a batch.
// The kernel answers synchronously while processing our sendmsg, so the
// replies are normally queued before we start reading.
const replyTimeout = 10 * time.Second

// result is what the kernel answered to one batch.
type result struct {
	infos  []msgInfo
	seqs   []uint32
	errs   map[uint32]error // by sequence number
	acked  map[uint32]bool
	echoes map[uint32][]netlink.Message // NEWRULE echoes by request sequence
}

// exchange sends b as one transaction and reads every reply to it.
//
// The kernel acks messages of a batch it then aborts, and it reports a
// failed commit against the BATCH_BEGIN message, so a reply per message
// proves nothing and we cannot know how many replies to expect. Instead a
// NLMSG_NOOP with NLM_F_ACK follows in its own sendmsg: the kernel processes
// each sendmsg to completion before returning, so once the noop's ack
// arrives every reply to the batch has been read, and nothing is left
// queued on the long-lived socket.
func exchange(c nlConn, b *batch) (*result, error) {
	msgs, infos := b.framed()
	sent, err := c.SendMessages(msgs)
	if err != nil {
		return nil, fmt.Errorf("nftables: sending batch: %w", err)
	}
	fence, err := c.SendMessages([]netlink.Message{{
		Header: netlink.Header{Type: netlink.Noop, Flags: netlink.Request | netlink.Acknowledge},
	}})
	if err != nil {
		return nil, fmt.Errorf("nftables: sending batch: %w", err)
	}
	fenceSeq := fence[0].Header.Sequence

	r := &result{
		infos:  infos,
		seqs:   make([]uint32, len(sent)),
		errs:   map[uint32]error{},
		acked:  map[uint32]bool{},
		echoes: map[uint32][]netlink.Message{},
	}
	ours := map[uint32]bool{}
	for i, m := range sent {
		r.seqs[i] = m.Header.Sequence
		ours[m.Header.Sequence] = true
	}

	// Tests' sockets have no deadline; the receive budget bounds them instead.
	_ = c.SetReadDeadline(time.Now().Add(replyTimeout))
	defer c.SetReadDeadline(time.Time{})
	for budget := 4*len(msgs) + 64; budget > 0; budget-- {
		replies, err := c.Receive()
		if err != nil {
			var oe *netlink.OpError
			if !errors.As(err, &oe) || oe.Sequence == 0 {
				return nil, fmt.Errorf("nftables: reading the kernel's answer: %w", err)
			}
			if oe.Sequence == fenceSeq {
				return r, nil
			}
			if ours[oe.Sequence] {
				r.errs[oe.Sequence] = cleanErr(err)
			}
			continue
		}
		for _, m := range replies {
			seq := m.Header.Sequence
			switch {
			case m.Header.Type == netlink.Error && seq == fenceSeq:
				return r, nil
			case !ours[seq]:
				// A late answer to an earlier exchange that timed out.
			case m.Header.Type == netlink.Error:
				r.acked[seq] = true
			default:
				r.echoes[seq] = append(r.echoes[seq], m)
			}
		}
	}
	return nil, fmt.Errorf("nftables: no complete answer from the kernel to the batch")
}

// firstError returns the first message, in batch order, the kernel
// refused. Later errors are usually consequences of the first (a chain
// fails because its table did).
func (r *result) firstError() (msgInfo, error) {
	for i, seq := range r.seqs {
		if err, ok := r.errs[seq]; ok {
			return r.infos[i], err
		}
	}
	return msgInfo{}, nil
}

// unanswered returns the first message that got neither an ack nor an error.
func (r *result) unanswered() (msgInfo, bool) {
	for i, seq := range r.seqs {
		if r.infos[i].kind == kindBatchMarker {
			continue
		}
		if !r.acked[seq] {
			if _, failed := r.errs[seq]; !failed {
				return r.infos[i], true
			}
		}
	}
	return msgInfo{}, false
}
