package nft

import (
	"encoding/binary"
	"errors"
	"testing"

	"github.com/mdlayher/netlink"
	"github.com/mdlayher/netlink/nltest"
	"golang.org/x/sys/unix"
)

// fakeKernel answers nf_tables batches the way nfnetlink does: an error per
// refused message and, on request, an ack per applied one, each in its own
// datagram and in message order; on commit, the NEWRULE echoes (one
// datagram) come first; a failed commit is reported against BATCH_BEGIN.
type fakeKernel struct {
	t *testing.T
	// refuse returns the errno for a message of a batch, 0 to apply it.
	refuse func(m netlink.Message) int
	// beginErr is answered to BATCH_BEGIN instead of processing the batch
	// (missing CAP_NET_ADMIN); commitErr after all messages passed.
	beginErr, commitErr int
	noEcho              bool
	// get answers non-batch requests (GETTABLE, dumps, GETGEN).
	get func(req netlink.Message) []netlink.Message

	batches    [][]netlink.Message // every batch received, BEGIN..END
	queue      [][]netlink.Message // datagrams not yet read
	nextHandle uint64
}

func (k *fakeKernel) conn() *netlink.Conn { return nltest.Dial(k.fn) }

func (k *fakeKernel) fn(req []netlink.Message) ([]netlink.Message, error) {
	if req == nil {
		if len(k.queue) == 0 {
			return nil, errors.New("fake kernel: read with nothing queued")
		}
		d := k.queue[0]
		k.queue = k.queue[1:]
		return d, nil
	}
	switch first := req[0]; {
	case first.Header.Type == unix.NFNL_MSG_BATCH_BEGIN:
		k.batch(req)
	case first.Header.Type == netlink.Noop:
		k.queue = append(k.queue, ack(first, 0))
	default:
		if k.get == nil {
			k.queue = append(k.queue, ack(first, int(unix.EOPNOTSUPP)))
			break
		}
		if replies := k.get(first); len(replies) > 0 {
			k.queue = append(k.queue, replies)
		}
	}
	return nil, nil
}

// ack is an NLMSG_ERROR answer: errno 0 acks, else refuses req.
func ack(req netlink.Message, errno int) []netlink.Message {
	hdr, err := req.MarshalBinary()
	if err != nil || len(hdr) < 16 {
		hdr = make([]byte, 16)
	}
	data := binary.NativeEndian.AppendUint32(nil, uint32(int32(-errno)))
	return []netlink.Message{{
		Header: netlink.Header{Type: netlink.Error, Sequence: req.Header.Sequence, PID: req.Header.PID},
		Data:   append(data, hdr[:16]...),
	}}
}

func (k *fakeKernel) batch(req []netlink.Message) {
	k.batches = append(k.batches, req)
	if k.beginErr != 0 {
		k.queue = append(k.queue, ack(req[0], k.beginErr))
		return
	}
	var errList [][]netlink.Message
	var echoes []netlink.Message
	failed := false
	for _, m := range req[1 : len(req)-1] {
		errno := 0
		if k.refuse != nil {
			errno = k.refuse(m)
		}
		if errno != 0 {
			failed = true
			errList = append(errList, ack(m, errno))
			continue
		}
		if m.Header.Flags&netlink.Acknowledge != 0 {
			errList = append(errList, ack(m, 0))
		}
		if m.Header.Type == nftType(unix.NFT_MSG_NEWRULE) && m.Header.Flags&netlink.Echo != 0 {
			k.nextHandle++
			echo := m
			echo.Header.Flags = 0
			echo.Data = append(append([]byte(nil), m.Data...), nltest.MustMarshalAttributes([]netlink.Attribute{
				{Type: unix.NFTA_RULE_HANDLE, Data: binary.BigEndian.AppendUint64(nil, k.nextHandle)},
			})...)
			echoes = append(echoes, echo)
		}
	}
	if !failed {
		switch {
		case k.commitErr != 0:
			k.queue = append(k.queue, ack(req[0], k.commitErr))
		case len(echoes) > 0 && !k.noEcho:
			k.queue = append(k.queue, echoes)
		}
	}
	k.queue = append(k.queue, errList...)
}

// inner returns the messages of batch i without BEGIN and END.
func (k *fakeKernel) inner(i int) []netlink.Message {
	b := k.batches[i]
	return b[1 : len(b)-1]
}

// attrs decodes the attributes after the nfgenmsg header, by type.
func attrs(t *testing.T, data []byte) map[uint16][]byte {
	t.Helper()
	ad, err := netlink.NewAttributeDecoder(data)
	if err != nil {
		t.Fatal(err)
	}
	out := map[uint16][]byte{}
	for ad.Next() {
		out[ad.Type()] = ad.Bytes()
	}
	if err := ad.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

func msgAttrs(t *testing.T, m netlink.Message) map[uint16][]byte {
	t.Helper()
	if len(m.Data) < 4 {
		t.Fatalf("message without nfgenmsg: %+v", m)
	}
	return attrs(t, m.Data[4:])
}
