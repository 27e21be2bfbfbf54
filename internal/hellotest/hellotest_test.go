package hellotest

import "testing"

func TestForIsOneHandshakeRecordWithALPN(t *testing.T) {
	b, err := For("example.org", []string{"acme-tls/1"})
	if err != nil {
		t.Fatal(err)
	}
	if len(b) < 5 || b[0] != 22 || int(b[3])<<8|int(b[4]) != len(b)-5 || b[5] != 1 {
		t.Fatalf("not one TLS handshake record holding a ClientHello: % x", b[:min(len(b), 8)])
	}
}
