package alpncert

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"time"
)

// Store reads challenge certificates from a directory at handshake time,
// so certificates written after the proxy started are served; a parsed
// pair is reused while neither file changes.
type Store struct {
	dir   string
	mu    sync.Mutex
	cache map[string]storedPair
}

type storedPair struct {
	certStamp, keyStamp fileStamp
	pair                *tls.Certificate
}

// fileStamp tells a changed file from the one parsed before.
type fileStamp struct {
	mod  time.Time
	size int64
	ino  uint64
}

// maxCached bounds the cache; a validation needs one or two entries.
const maxCached = 64

// NewStore serves the certificates in dir.
func NewStore(dir string) *Store { return &Store{dir: dir, cache: map[string]storedPair{}} }

// Dir is the directory the store reads.
func (s *Store) Dir() string { return s.dir }

// Certificate returns the pair for base (see FileBase). Both files must
// be regular files, not symbolic links: the proxy may read DIR with more
// privileges than whoever writes it.
func (s *Store) Certificate(base string) (*tls.Certificate, error) {
	certFile, certStamp, err := openChallengeFile(filepath.Join(s.dir, base+CertSuffix))
	if err != nil {
		return nil, err
	}
	defer certFile.Close()
	keyFile, keyStamp, err := openChallengeFile(filepath.Join(s.dir, base+KeySuffix))
	if err != nil {
		return nil, err
	}
	defer keyFile.Close()
	s.mu.Lock()
	c, ok := s.cache[base]
	s.mu.Unlock()
	if ok && c.certStamp == certStamp && c.keyStamp == keyStamp {
		return c.pair, nil
	}
	certPEM, err := io.ReadAll(io.LimitReader(certFile, maxFileSize))
	if err != nil {
		return nil, err
	}
	keyPEM, err := io.ReadAll(io.LimitReader(keyFile, maxFileSize))
	if err != nil {
		return nil, err
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("challenge certificate %s: %w", certFile.Name(), err)
	}
	s.mu.Lock()
	if len(s.cache) >= maxCached {
		clear(s.cache)
	}
	s.cache[base] = storedPair{certStamp, keyStamp, &pair}
	s.mu.Unlock()
	return &pair, nil
}

// maxFileSize bounds what is read of a challenge file; dehydrated's are
// under 2 KiB.
const maxFileSize = 64 << 10

// openChallengeFile opens path if it is a regular file of at most
// maxFileSize, without following a symbolic link and without blocking
// on a FIFO.
func openChallengeFile(path string) (*os.File, fileStamp, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		if errors.Is(err, syscall.ELOOP) {
			return nil, fileStamp{}, fmt.Errorf("challenge certificate %s: a symbolic link, refused", path)
		}
		return nil, fileStamp{}, fmt.Errorf("no challenge certificate: %w", err)
	}
	fi, err := f.Stat()
	switch {
	case err != nil:
	case !fi.Mode().IsRegular():
		err = fmt.Errorf("challenge certificate %s: not a regular file", path)
	case fi.Size() > maxFileSize:
		err = fmt.Errorf("challenge certificate %s: %d bytes, more than %d", path, fi.Size(), maxFileSize)
	}
	if err != nil {
		f.Close()
		return nil, fileStamp{}, err
	}
	st := fileStamp{mod: fi.ModTime(), size: fi.Size()}
	if sys, ok := fi.Sys().(*syscall.Stat_t); ok {
		st.ino = sys.Ino
	}
	return f, st, nil
}

// Responder answers TLS-ALPN-01 validation handshakes from a Store.
type Responder struct {
	store *Store
}

// NewResponder answers with the certificates in dir.
func NewResponder(dir string) *Responder { return &Responder{store: NewStore(dir)} }

// Dir is the certificate directory.
func (r *Responder) Dir() string { return r.store.dir }

// Result is what one Answer did, for the connection's log line.
type Result struct {
	Cert     string // the certificate file presented; "" if none
	Up, Down int64  // bytes read (the replayed hello included) and written
	Err      error  // nil when the handshake completed
	TimedOut bool   // the deadline ended it
}

// ErrNoACME is the handshake error for a client that did not offer
// acme-tls/1: a challenge certificate is never shown to it.
var ErrNoACME = errors.New("client did not offer acme-tls/1: no challenge certificate for it")

// Answer completes the TLS handshake of conn, whose first bytes, hello,
// were already read from it: it negotiates acme-tls/1 and presents the
// challenge certificate for the SNI name, or fails with an alert. The
// handshake ends by deadline, and Answer closes conn.
func (r *Responder) Answer(conn net.Conn, hello []byte, deadline time.Time) Result {
	var res Result
	rc := &replayConn{Conn: conn, hello: hello}
	cfg := &tls.Config{
		MinVersion:             tls.VersionTLS12,
		NextProtos:             []string{Protocol},
		SessionTicketsDisabled: true,
		GetCertificate: func(hi *tls.ClientHelloInfo) (*tls.Certificate, error) {
			if !slices.Contains(hi.SupportedProtos, Protocol) {
				return nil, ErrNoACME
			}
			base, err := FileBase(hi.ServerName)
			if err != nil {
				return nil, fmt.Errorf("server name refused: %w", err)
			}
			pair, err := r.store.Certificate(base)
			if err != nil {
				return nil, err
			}
			res.Cert = base + CertSuffix
			return pair, nil
		},
	}
	conn.SetDeadline(deadline)
	tc := tls.Server(rc, cfg)
	res.Err = tc.Handshake()
	if res.Err == nil && tc.ConnectionState().NegotiatedProtocol != Protocol {
		res.Err = ErrNoACME // unreachable: GetCertificate refused such clients
	}
	if res.Err != nil {
		var ne net.Error
		res.TimedOut = errors.As(res.Err, &ne) && ne.Timeout()
		conn.Close()
	} else {
		tc.Close() // close_notify, within the deadline
	}
	res.Up, res.Down = rc.up, rc.down
	return res
}

// replayConn serves the already-read hello bytes before the socket's.
type replayConn struct {
	net.Conn
	hello    []byte
	up, down int64
}

func (c *replayConn) Read(p []byte) (int, error) {
	if len(c.hello) > 0 {
		n := copy(p, c.hello)
		c.hello = c.hello[n:]
		c.up += int64(n)
		return n, nil
	}
	n, err := c.Conn.Read(p)
	c.up += int64(n)
	return n, err
}

func (c *replayConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.down += int64(n)
	return n, err
}
