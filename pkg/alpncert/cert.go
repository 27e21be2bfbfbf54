package alpncert

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Protocol is the ALPN protocol of TLS-ALPN-01 validation (RFC 8737).
const Protocol = "acme-tls/1"

// OIDACMEIdentifier is id-pe-acmeIdentifier, the critical extension of a
// challenge certificate holding SHA-256(key authorization).
var OIDACMEIdentifier = asn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 1, 31}

// File name suffixes, as dehydrated writes them.
const (
	CertSuffix = ".crt.pem"
	KeySuffix  = ".key.pem"
)

// KeyAuthDigest returns SHA-256 of a key authorization. auth is either
// the key authorization itself ("token.thumbprint") or its digest in
// base64url, as uacme passes it to hooks; a key authorization always has
// a ".", which base64url never has.
func KeyAuthDigest(auth string) ([sha256.Size]byte, error) {
	var d [sha256.Size]byte
	if strings.Contains(auth, ".") {
		return sha256.Sum256([]byte(auth)), nil
	}
	b, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(auth, "="))
	if err != nil || len(b) != sha256.Size {
		return d, fmt.Errorf("key authorization %q: neither token.thumbprint nor a base64url SHA-256 digest", auth)
	}
	copy(d[:], b)
	return d, nil
}

// NewChallengeCert makes the RFC 8737 certificate for ident (a DNS name
// or an IP address): self-signed with a fresh P-256 key, exactly one
// subjectAltName, and the critical acmeIdentifier extension holding the
// digest as an ASN.1 OCTET STRING. It returns both in PEM.
func NewChallengeCert(ident string, digest [sha256.Size]byte) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	value, err := asn1.Marshal(digest[:])
	if err != nil {
		return nil, nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:    serial,
		NotBefore:       now.Add(-time.Hour),
		NotAfter:        now.Add(7 * 24 * time.Hour),
		KeyUsage:        x509.KeyUsageDigitalSignature,
		ExtKeyUsage:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		ExtraExtensions: []pkix.Extension{{Id: OIDACMEIdentifier, Critical: true, Value: value}},
	}
	if a, perr := netip.ParseAddr(ident); perr == nil {
		tmpl.IPAddresses = []net.IP{a.Unmap().AsSlice()}
	} else {
		tmpl.DNSNames = []string{ident}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), nil
}

// WriteChallenge writes ident's challenge certificate and key into dir
// (created 0700 if missing): the key 0600 first, then the certificate,
// each by rename, so a handshake never reads half a file.
func WriteChallenge(dir, ident string, digest [sha256.Size]byte) (certPath string, err error) {
	base, err := IdentFileBase(ident)
	if err != nil {
		return "", err
	}
	certPEM, keyPEM, err := NewChallengeCert(base, digest)
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	if err := writeFileAtomic(filepath.Join(dir, base+KeySuffix), keyPEM, 0o600); err != nil {
		return "", err
	}
	certPath = filepath.Join(dir, base+CertSuffix)
	return certPath, writeFileAtomic(certPath, certPEM, 0o644)
}

// RemoveChallenge deletes ident's challenge certificate and key; files
// already gone are not an error.
func RemoveChallenge(dir, ident string) error {
	base, err := IdentFileBase(ident)
	if err != nil {
		return err
	}
	var errs []error
	for _, suffix := range []string{CertSuffix, KeySuffix} {
		if err := os.Remove(filepath.Join(dir, base+suffix)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), ".tmp-"+filepath.Base(path)+"-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(mode)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
	}
	return err
}
