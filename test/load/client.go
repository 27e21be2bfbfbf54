package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"time"
)

// Hellos are generated once: crypto/tls makes a fresh key share per hello,
// which would cost the client process more CPU than the proxy spends.
var (
	webHello  = clientHello("www.load.test", []string{"h2", "http/1.1"})
	acmeHello = clientHello("www.load.test", []string{"acme-tls/1"})
)

// session is one client connection that got through to a backend.
type session struct {
	c    *net.TCPConn
	tag  byte   // 'W' or 'A'
	peer string // who the backend saw connecting
}

// openSession dials addr, sends hello and cmd and reads the backend's
// header line, all within timeout.
func openSession(d *net.Dialer, addr string, hello []byte, cmd byte, timeout time.Duration) (*session, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	start := time.Now()
	nc, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("dial: %w", err)
	}
	c := nc.(*net.TCPConn)
	c.SetDeadline(time.Now().Add(timeout))
	msg := append(append(make([]byte, 0, len(hello)+1), hello...), cmd)
	if _, err := c.Write(msg); err != nil {
		c.Close()
		return nil, fmt.Errorf("write hello: %w", err)
	}
	line, err := readLine(c, 128)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("read header (%v after dial start): %w", time.Since(start).Round(time.Millisecond), err)
	}
	tag, peer, ok := strings.Cut(line, " ")
	if !ok || len(tag) != 1 {
		c.Close()
		return nil, fmt.Errorf("bad header %q", line)
	}
	c.SetDeadline(time.Time{})
	return &session{c: c, tag: tag[0], peer: peer}, nil
}

// readLine reads byte by byte up to '\n' so nothing after it is consumed.
func readLine(r io.Reader, max int) (string, error) {
	var b [1]byte
	var line []byte
	for len(line) < max {
		if _, err := io.ReadFull(r, b[:]); err != nil {
			if errors.Is(err, io.EOF) && len(line) > 0 {
				err = io.ErrUnexpectedEOF
			}
			return "", err
		}
		if b[0] == '\n' {
			return string(line), nil
		}
		line = append(line, b[0])
	}
	return "", errors.New("header line too long")
}

// ping writes n bytes and reads them back from the echo backend.
func (s *session) ping(n int, timeout time.Duration) error {
	s.c.SetDeadline(time.Now().Add(timeout))
	defer s.c.SetDeadline(time.Time{})
	out := bytes.Repeat([]byte{'p'}, n)
	if _, err := s.c.Write(out); err != nil {
		return err
	}
	in := make([]byte, n)
	if _, err := io.ReadFull(s.c, in); err != nil {
		return err
	}
	if !bytes.Equal(in, out) {
		return errors.New("echo differs")
	}
	return nil
}

// reset closes with RST (SO_LINGER 0), as a crashed or impatient client.
func (s *session) reset() {
	s.c.SetLinger(0)
	s.c.Close()
}

// exchange is one full normal request: connect, hello, header, 16-byte
// echo, close. It returns how long it took.
func exchange(d *net.Dialer, addr string, timeout time.Duration) (time.Duration, error) {
	start := time.Now()
	s, err := openSession(d, addr, webHello, cmdEcho, timeout)
	if err != nil {
		return time.Since(start), err
	}
	defer s.c.Close()
	if err := s.ping(16, timeout); err != nil {
		return time.Since(start), err
	}
	return time.Since(start), nil
}

// errKind names an error for a table cell.
func errKind(err error) string {
	var ne net.Error
	switch {
	case err == nil:
		return "ok"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused"
	case errors.Is(err, syscall.ECONNRESET):
		return "reset"
	case errors.Is(err, syscall.EPIPE):
		return "broken pipe"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return "closed"
	case errors.Is(err, os.ErrDeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	case errors.Is(err, syscall.EADDRNOTAVAIL):
		return "no local port"
	case errors.Is(err, syscall.EMFILE):
		return "client EMFILE"
	}
	return "other: " + err.Error()
}

// tally counts outcomes by errKind.
type tally map[string]int

// add counts err under its kind, prefixed by the step of openSession that
// failed, if any.
func (t tally) add(err error) {
	k := errKind(err)
	if err != nil {
		for _, step := range []string{"dial", "write hello", "read header"} {
			if strings.HasPrefix(err.Error(), step) {
				k = step + ": " + k
			}
		}
	}
	t[k]++
}

func (t tally) String() string {
	if len(t) == 0 {
		return "none"
	}
	keys := make([]string, 0, len(t))
	for k := range t {
		keys = append(keys, k)
	}
	sortStrings(keys)
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s %d", k, t[k]))
	}
	return strings.Join(parts, ", ")
}
