package nft

import (
	"encoding/binary"
	"errors"
	"fmt"
	"iter"
	"time"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// ctnetlink message types and attributes
// (include/uapi/linux/netfilter/nfnetlink_conntrack.h).
const (
	ctMsgGet    = 1 // IPCTNL_MSG_CT_GET
	ctMsgDelete = 2 // IPCTNL_MSG_CT_DELETE

	ctaTupleOrig  = 1  // CTA_TUPLE_ORIG
	ctaTupleReply = 2  // CTA_TUPLE_REPLY
	ctaID         = 12 // CTA_ID
	ctaZone       = 18 // CTA_ZONE

	ctaTupleProto = 2 // CTA_TUPLE_PROTO
	ctaProtoNum   = 1 // CTA_PROTO_NUM
	ctaProtoSrc   = 2 // CTA_PROTO_SRC_PORT
	ctaProtoDst   = 3 // CTA_PROTO_DST_PORT
)

// ctConn is what conntrack cleanup needs of a netlink connection.
type ctConn interface {
	Send(netlink.Message) (netlink.Message, error)
	ReceiveIter() iter.Seq2[netlink.Message, error]
	Execute(netlink.Message) ([]netlink.Message, error)
	SetReadDeadline(time.Time) error
}

// ctEntry is what we need to delete one conntrack entry: its original
// tuple exactly as the kernel gave it, and its id (so an entry that was
// replaced meanwhile by a new one with the same tuple is left alone).
type ctEntry struct {
	family byte
	orig   []byte
	id     []byte
	zone   []byte
}

// DeleteConntrack deletes, in the current network namespace, the conntrack
// entries of TCP connections our redirect translated — reply source port
// listenPort, original destination port another one — for IPv4 and IPv6.
// Left behind, such an entry can send a new connection that reuses the
// 4-tuple to the dead listener. It returns how many entries it deleted.
func DeleteConntrack(listenPort uint16) (int, error) {
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, nil)
	if err != nil {
		return 0, fmt.Errorf("conntrack: %w", err)
	}
	defer c.Close()
	return deleteConntrack(c, listenPort)
}

func deleteConntrack(c ctConn, listenPort uint16) (int, error) {
	entries, err := redirectedEntries(c, listenPort)
	if err != nil {
		return 0, err
	}
	deleted := 0
	for _, e := range entries {
		attrs := []netlink.Attribute{
			{Type: unix.NLA_F_NESTED | ctaTupleOrig, Data: e.orig},
			{Type: ctaID, Data: e.id},
		}
		if e.zone != nil {
			attrs = append(attrs, netlink.Attribute{Type: ctaZone, Data: e.zone})
		}
		data, err := netlink.MarshalAttributes(attrs)
		if err != nil {
			return deleted, err
		}
		_, err = c.Execute(netlink.Message{
			Header: netlink.Header{Type: ctType(ctMsgDelete), Flags: netlink.Request | netlink.Acknowledge},
			Data:   append(nfgenmsg(e.family, 0), data...),
		})
		switch {
		case err == nil:
			deleted++
		case errors.Is(err, unix.ENOENT):
			// Expired or replaced since the dump.
		default:
			return deleted, ctError("deleting an entry", err)
		}
	}
	return deleted, nil
}

func ctType(msg int) netlink.HeaderType {
	return netlink.HeaderType(unix.NFNL_SUBSYS_CTNETLINK<<8 | msg)
}

func ctError(what string, err error) error {
	err = cleanErr(err)
	if errors.Is(err, unix.EPERM) {
		return fmt.Errorf("conntrack: %s: %w (run as root or with CAP_NET_ADMIN)", what, err)
	}
	return fmt.Errorf("conntrack: %s: %w", what, err)
}

// redirectedEntries dumps the conntrack table, keeping only our entries,
// so memory stays proportional to them rather than to the table.
func redirectedEntries(c ctConn, listenPort uint16) ([]ctEntry, error) {
	_, err := c.Send(netlink.Message{
		Header: netlink.Header{Type: ctType(ctMsgGet), Flags: netlink.Request | netlink.Dump},
		Data:   nfgenmsg(unix.AF_UNSPEC, 0),
	})
	if err != nil {
		return nil, ctError("dump", err)
	}
	_ = c.SetReadDeadline(time.Now().Add(replyTimeout))
	defer c.SetReadDeadline(time.Time{})
	var out []ctEntry
	for m, err := range c.ReceiveIter() {
		if err != nil {
			return nil, ctError("dump", err)
		}
		if m.Header.Type != ctType(0) || len(m.Data) < 4 { // IPCTNL_MSG_CT_NEW
			continue
		}
		if e, ok := parseCtEntry(m.Data, listenPort); ok {
			out = append(out, e)
		}
	}
	return out, nil
}

// parseCtEntry returns the entry if it is a TCP connection redirected to
// listenPort; malformed entries are skipped.
func parseCtEntry(data []byte, listenPort uint16) (ctEntry, bool) {
	e := ctEntry{family: data[0]}
	if e.family != unix.AF_INET && e.family != unix.AF_INET6 {
		return e, false
	}
	ad, err := netlink.NewAttributeDecoder(data[4:])
	if err != nil {
		return e, false
	}
	var reply []byte
	for ad.Next() {
		switch ad.Type() {
		case ctaTupleOrig:
			e.orig = ad.Bytes()
		case ctaTupleReply:
			reply = ad.Bytes()
		case ctaID:
			e.id = ad.Bytes()
		case ctaZone:
			e.zone = ad.Bytes()
		}
	}
	if ad.Err() != nil || len(e.orig) == 0 || len(e.id) != 4 {
		// Without the original tuple a delete request would flush the
		// whole table: never build one.
		return e, false
	}
	proto, _, origDst, ok1 := tupleProto(e.orig)
	_, replySrc, _, ok2 := tupleProto(reply)
	if !ok1 || !ok2 || proto != unix.IPPROTO_TCP {
		return e, false
	}
	return e, replySrc == listenPort && origDst != listenPort
}

// tupleProto reads protocol and ports from a CTA_TUPLE_* attribute.
func tupleProto(tuple []byte) (proto uint8, src, dst uint16, ok bool) {
	ad, err := netlink.NewAttributeDecoder(tuple)
	if err != nil {
		return 0, 0, 0, false
	}
	var seen int
	for ad.Next() {
		if ad.Type() != ctaTupleProto {
			continue
		}
		pad, err := netlink.NewAttributeDecoder(ad.Bytes())
		if err != nil {
			return 0, 0, 0, false
		}
		for pad.Next() {
			b := pad.Bytes()
			switch pad.Type() {
			case ctaProtoNum:
				if len(b) == 1 {
					proto, seen = b[0], seen|1
				}
			case ctaProtoSrc:
				if len(b) == 2 {
					src, seen = binary.BigEndian.Uint16(b), seen|2
				}
			case ctaProtoDst:
				if len(b) == 2 {
					dst, seen = binary.BigEndian.Uint16(b), seen|4
				}
			}
		}
		if pad.Err() != nil {
			return 0, 0, 0, false
		}
	}
	return proto, src, dst, ad.Err() == nil && seen == 7
}
