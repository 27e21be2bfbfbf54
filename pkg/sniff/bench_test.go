package sniff

import (
	"bytes"
	"crypto/tls"
	"testing"
)

// BenchmarkRead measures the per-connection cost of sniffing: with pooling
// the steady state should allocate nothing for common ALPN values and a
// repeated SNI.
func BenchmarkRead(b *testing.B) {
	pq := captureClientHello(b, &tls.Config{ServerName: "www.example.org", NextProtos: []string{"h2", "http/1.1"}})
	classic := captureClientHello(b, &tls.Config{ServerName: "www.example.org", NextProtos: []string{"h2", "http/1.1"}, CurvePreferences: []tls.CurveID{tls.X25519}})
	acme := captureClientHello(b, &tls.Config{ServerName: "www.example.org", NextProtos: []string{ACMEProtocol}})
	for _, bc := range []struct {
		name   string
		stream []byte
	}{
		{"classic", classic},
		{"pq", pq},
		{"pq-100-byte-records", frame(handshakeBytes(b, pq), 100)},
		{"acme", acme},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(bc.stream)))
			r := bytes.NewReader(bc.stream)
			for b.Loop() {
				r.Reset(bc.stream)
				h, err := Read(r)
				if err != nil || h.Kind != Complete {
					b.Fatalf("Kind %v err %v", h.Kind, err)
				}
				h.Release()
			}
		})
	}
}
