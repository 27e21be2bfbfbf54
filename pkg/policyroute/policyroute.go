// Package policyroute adds and removes, over rtnetlink, the policy routing
// that delivers replies for connections the proxy dialed from a client's
// address back to this host:
//
//	ip rule add fwmark MARK/MARK lookup TABLE pref PRIORITY      (IPv4, IPv6)
//	ip route add local default dev lo table TABLE                (IPv4, IPv6)
//
// A reply addressed to the client (not a local address) carries MARK,
// restored from its connection by our netfilter rules; the rule sends it
// to TABLE, where every address is local, so it reaches the proxy's
// socket instead of leaving the host. Without a packet that carries MARK
// the entries change nothing, which makes ones left by a killed process
// harmless until the next start or stop removes them.
//
// Entries are ours when they name our table: everything in TABLE, and
// every rule that looks it up.
package policyroute

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"strings"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Config names our mark, table and rule priority.
type Config struct {
	Mark     uint32 // the mark bit(s); the rule matches MARK/MARK
	Table    uint32
	Priority uint32
}

// Entry is one rule or route of ours.
type Entry struct {
	Family   int // unix.AF_INET or unix.AF_INET6
	Route    bool
	Mark     uint32 // rules
	Mask     uint32
	Priority uint32
	Table    uint32
	DstLen   uint8 // routes
	Dst      []byte
	Type     uint8
	OIF      uint32
}

func (e Entry) String() string {
	v := "-4"
	if e.Family == unix.AF_INET6 {
		v = "-6"
	}
	if !e.Route {
		return fmt.Sprintf("ip %s rule: pref %d fwmark %#x/%#x lookup %d", v, e.Priority, e.Mark, e.Mask, e.Table)
	}
	dst := "default"
	if e.DstLen > 0 {
		dst = fmt.Sprintf("%v/%d", net.IP(e.Dst), e.DstLen)
	}
	kind := "unicast"
	if e.Type == unix.RTN_LOCAL {
		kind = "local"
	}
	dev := fmt.Sprintf("if%d", e.OIF)
	if ifc, err := net.InterfaceByIndex(int(e.OIF)); err == nil {
		dev = ifc.Name
	}
	return fmt.Sprintf("ip %s route: %s %s dev %s table %d", v, kind, dst, dev, e.Table)
}

// Families are the address families we route; IPv6 is skipped where the
// kernel has none.
var families = []int{unix.AF_INET, unix.AF_INET6}

// Dial opens a routing netlink socket in the current network namespace.
func Dial() (*netlink.Conn, error) {
	c, err := netlink.Dial(unix.NETLINK_ROUTE, nil)
	if err != nil {
		return nil, fmt.Errorf("policy routing: rtnetlink: %w", err)
	}
	return c, nil
}

// Install removes entries of ours a previous run left, then adds the rule
// and the route for each family. On error nothing of ours stays.
func Install(c *netlink.Conn, cfg Config) error {
	if cfg.Mark == 0 || cfg.Table == 0 || cfg.Table == unix.RT_TABLE_LOCAL || cfg.Table == unix.RT_TABLE_MAIN || cfg.Table == unix.RT_TABLE_DEFAULT {
		return fmt.Errorf("policy routing: mark %#x, table %d: want a non-zero mark and a table other than 0, 253, 254, 255", cfg.Mark, cfg.Table)
	}
	if _, err := Remove(c, cfg); err != nil {
		return err
	}
	lo, err := net.InterfaceByName("lo")
	if err != nil {
		return fmt.Errorf("policy routing: %w", err)
	}
	for _, f := range families {
		route := Entry{Family: f, Route: true, Table: cfg.Table, Type: unix.RTN_LOCAL, OIF: uint32(lo.Index)}
		rule := Entry{Family: f, Mark: cfg.Mark, Mask: cfg.Mark, Priority: cfg.Priority, Table: cfg.Table}
		for _, e := range []Entry{route, rule} {
			err := execute(c, e.message(true))
			if f == unix.AF_INET6 && errors.Is(err, unix.EAFNOSUPPORT) {
				break // no IPv6 in this kernel
			}
			if err != nil {
				_, rerr := Remove(c, cfg)
				return errors.Join(fmt.Errorf("policy routing: adding %s: %w", e, err), rerr)
			}
		}
	}
	return nil
}

// Remove deletes every entry of ours and returns what it deleted.
func Remove(c *netlink.Conn, cfg Config) ([]Entry, error) {
	found, err := List(c, cfg)
	if err != nil {
		return nil, err
	}
	var errs []error
	var removed []Entry
	for _, e := range found {
		if err := execute(c, e.message(false)); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("policy routing: deleting %s: %w", e, err))
			continue
		}
		removed = append(removed, e)
	}
	return removed, errors.Join(errs...)
}

// List returns the rules that look up cfg.Table and the routes in it.
func List(c *netlink.Conn, cfg Config) ([]Entry, error) {
	var out []Entry
	for _, f := range families {
		for _, typ := range []netlink.HeaderType{unix.RTM_GETRULE, unix.RTM_GETROUTE} {
			hdr := make([]byte, 12) // fib_rule_hdr or rtmsg; only the family is set
			hdr[0] = byte(f)
			msgs, err := c.Execute(netlink.Message{
				Header: netlink.Header{Type: typ, Flags: netlink.Request | netlink.Dump},
				Data:   hdr,
			})
			if f == unix.AF_INET6 && errors.Is(err, unix.EAFNOSUPPORT) {
				break
			}
			if err != nil {
				return nil, fmt.Errorf("policy routing: listing: %w", err)
			}
			for _, m := range msgs {
				e, ok := parse(m)
				if ok && e.Table == cfg.Table {
					out = append(out, e)
				}
			}
		}
	}
	return out, nil
}

func execute(c *netlink.Conn, m netlink.Message) error {
	_, err := c.Execute(m)
	return err
}

// Attribute types (include/uapi/linux/fib_rules.h, rtnetlink.h).
const (
	fraPriority = 6
	fraFwmark   = 10
	fraTable    = 15
	fraFwmask   = 16
	rtaDst      = 1
	rtaOIF      = 4
	rtaTable    = 15
	frActToTbl  = 1
)

// message builds the RTM_NEW* (add) or RTM_DEL* message for e. Both
// headers are 12 bytes: family first, the 8-bit table at offset 4.
func (e Entry) message(add bool) netlink.Message {
	h := make([]byte, 12)
	h[0] = byte(e.Family)
	if e.Table < 256 {
		h[4] = byte(e.Table)
	}
	var attrs []netlink.Attribute
	u32 := func(v uint32) []byte { return binary.NativeEndian.AppendUint32(nil, v) }
	var typ netlink.HeaderType
	if e.Route {
		typ = unix.RTM_DELROUTE
		h[1] = e.DstLen
		if add {
			typ = unix.RTM_NEWROUTE
			h[5] = unix.RTPROT_BOOT
		}
		h[6] = unix.RT_SCOPE_HOST
		h[7] = e.Type
		if e.DstLen > 0 {
			attrs = append(attrs, netlink.Attribute{Type: rtaDst, Data: e.Dst})
		}
		attrs = append(attrs,
			netlink.Attribute{Type: rtaTable, Data: u32(e.Table)},
			netlink.Attribute{Type: rtaOIF, Data: u32(e.OIF)})
	} else {
		typ = unix.RTM_DELRULE
		if add {
			typ = unix.RTM_NEWRULE
		}
		h[7] = frActToTbl
		attrs = append(attrs,
			netlink.Attribute{Type: fraPriority, Data: u32(e.Priority)},
			netlink.Attribute{Type: fraFwmark, Data: u32(e.Mark)},
			netlink.Attribute{Type: fraFwmask, Data: u32(e.Mask)},
			netlink.Attribute{Type: fraTable, Data: u32(e.Table)})
	}
	flags := netlink.Request | netlink.Acknowledge
	if add {
		flags |= netlink.Create | netlink.Excl
	}
	data, _ := netlink.MarshalAttributes(attrs) // fixed-size attributes cannot fail
	return netlink.Message{Header: netlink.Header{Type: typ, Flags: flags}, Data: append(h, data...)}
}

// parse reads a rule or route of a dump; ok is false for anything else.
func parse(m netlink.Message) (Entry, bool) {
	if len(m.Data) < 12 {
		return Entry{}, false
	}
	h := m.Data[:12]
	e := Entry{Family: int(h[0]), Table: uint32(h[4])}
	switch m.Header.Type {
	case unix.RTM_NEWROUTE:
		e.Route, e.DstLen, e.Type = true, h[1], h[7]
	case unix.RTM_NEWRULE:
	default:
		return Entry{}, false
	}
	ad, err := netlink.NewAttributeDecoder(m.Data[12:])
	if err != nil {
		return Entry{}, false
	}
	for ad.Next() {
		switch t := ad.Type(); {
		case e.Route && t == rtaTable, !e.Route && t == fraTable:
			e.Table = ad.Uint32()
		case e.Route && t == rtaDst:
			e.Dst = ad.Bytes()
		case e.Route && t == rtaOIF:
			e.OIF = ad.Uint32()
		case !e.Route && t == fraPriority:
			e.Priority = ad.Uint32()
		case !e.Route && t == fraFwmark:
			e.Mark = ad.Uint32()
		case !e.Route && t == fraFwmask:
			e.Mask = ad.Uint32()
		}
	}
	return e, ad.Err() == nil
}

// Describe lists our entries one per line, for status.
func Describe(es []Entry) string {
	var b strings.Builder
	for _, e := range es {
		fmt.Fprintf(&b, "  %s\n", e)
	}
	return b.String()
}
