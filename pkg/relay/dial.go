package relay

// DialOptions say how the engine connects to the backend Route chose.
// Route sets them on Conn.Dial; every connection starts with none.
type DialOptions struct {
	// Header is written to the backend before the ClientHello (a PROXY
	// protocol header). It is Route's buffer and must stay unchanged until
	// Done. The engine keeps its capacity for the connection that next
	// reuses the Conn, so Route can append to c.Dial.Header[:0] and
	// allocate nothing once the Conns are warm. It does not count in
	// Conn.Up, which is the client's bytes.
	Header []byte
}
