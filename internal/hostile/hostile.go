// Package hostile plays misbehaving NBD clients against a server: bad
// handshakes, oversize and malformed requests, unknown commands and flags,
// writes on read-only exports, abrupt closes in the middle of a reply,
// connections closed with requests in flight. Each Session is one raw
// byte stream; Play sends it on a new connection and drops it. The
// integration tests and cmd/nbdhostile both use it; neither trusts the
// server to answer sensibly, only to survive and keep serving others.
package hostile

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"slices"
	"time"
)

// Protocol constants (nbd-proto.md).
const (
	nbdMagic    = 0x4e42444d41474943 // "NBDMAGIC"
	optsMagic   = 0x49484156454f5054 // "IHAVEOPT"
	replyMagic  = 0x0003e889045565a9
	reqMagic    = 0x25609513
	extReqMagic = 0x21e41c71

	OptExportName   = 1
	OptAbort        = 2
	OptList         = 3
	OptStartTLS     = 5
	OptGo           = 7
	OptStructured   = 8
	OptSetMeta      = 10
	OptExtended     = 11
	RepAck          = 1
	CmdRead         = 0
	CmdWrite        = 1
	CmdDisc         = 2
	CmdFlush        = 3
	CmdTrim         = 4
	CmdCache        = 5
	CmdWriteZeroes  = 6
	CmdBlockStatus  = 7
	ClientFixed     = 1
	ClientNoZeroes  = 2
	maxOptReplySize = 64 << 10
)

var be = binary.BigEndian

// Opt encodes an option request.
func Opt(opt uint32, data []byte) []byte {
	b := be.AppendUint64(nil, optsMagic)
	b = be.AppendUint32(b, opt)
	b = be.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// Req encodes a transmission request header (extended: 64-bit length).
func Req(ext bool, flags, typ uint16, cookie, off, length uint64) []byte {
	magic := uint32(reqMagic)
	if ext {
		magic = extReqMagic
	}
	b := be.AppendUint32(nil, magic)
	b = be.AppendUint16(b, flags)
	b = be.AppendUint16(b, typ)
	b = be.AppendUint64(b, cookie)
	b = be.AppendUint64(b, off)
	if ext {
		return be.AppendUint64(b, length)
	}
	return be.AppendUint32(b, uint32(length))
}

// GoData is NBD_OPT_GO's data for the default export, no info requests.
func GoData() []byte { return []byte{0, 0, 0, 0, 0, 0} }

// MetaData is NBD_OPT_SET_META_CONTEXT's data for the default export.
func MetaData(names ...string) []byte {
	b := be.AppendUint32(nil, 0)
	b = be.AppendUint32(b, uint32(len(names)))
	for _, n := range names {
		b = be.AppendUint32(b, uint32(len(n)))
		b = append(b, n...)
	}
	return b
}

// Handshake connects, negotiates fixed newstyle without zeroes, the mode
// option (0, OptStructured or OptExtended) and contexts, then NBD_OPT_GO
// for the default export. It returns the connection in transmission.
func Handshake(network, addr string, mode uint32, contexts ...string) (net.Conn, error) {
	c, err := net.DialTimeout(network, addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(c)
	var hello [18]byte
	if _, err := io.ReadFull(r, hello[:]); err != nil {
		c.Close()
		return nil, fmt.Errorf("greeting: %w", err)
	}
	if be.Uint64(hello[:]) != nbdMagic || be.Uint64(hello[8:]) != optsMagic {
		c.Close()
		return nil, errors.New("bad greeting")
	}
	b := be.AppendUint32(nil, ClientFixed|ClientNoZeroes)
	n := 1
	if mode != 0 {
		b = append(b, Opt(mode, nil)...)
		n++
	}
	if len(contexts) > 0 {
		b = append(b, Opt(OptSetMeta, MetaData(contexts...))...)
		n++
	}
	b = append(b, Opt(OptGo, GoData())...)
	if _, err := c.Write(b); err != nil {
		c.Close()
		return nil, err
	}
	for i := 0; i < n; {
		var h [20]byte
		if _, err := io.ReadFull(r, h[:]); err != nil {
			c.Close()
			return nil, err
		}
		if be.Uint64(h[:]) != replyMagic {
			c.Close()
			return nil, errors.New("bad option reply magic")
		}
		typ, length := be.Uint32(h[12:]), be.Uint32(h[16:])
		if length > maxOptReplySize {
			c.Close()
			return nil, fmt.Errorf("option reply of %d bytes", length)
		}
		if _, err := io.CopyN(io.Discard, r, int64(length)); err != nil {
			c.Close()
			return nil, err
		}
		switch typ {
		case 2, 3, 4: // INFO, SERVER, META_CONTEXT: more to come
			continue
		case RepAck:
			i++
		default:
			c.Close()
			return nil, fmt.Errorf("option %d refused: reply %#x", i, typ)
		}
	}
	if r.Buffered() > 0 {
		c.Close()
		return nil, errors.New("server sent data after NBD_OPT_GO")
	}
	c.SetDeadline(time.Time{})
	return c, nil
}

// Session is one hostile byte stream.
type Session struct {
	Name string
	// Handshake: negotiate structured replies and Contexts, then GO,
	// before sending Bytes.
	Handshake bool
	Contexts  []string
	Bytes     []byte
	// ReadSome > 0: read this many reply bytes, then close (an abrupt
	// close in the middle of a reply).
	ReadSome int
}

// Sessions returns every kind of hostile session. size is the export
// size (for requests aimed at its end); contexts are negotiated by the
// sessions that reach transmission.
func Sessions(size int64, contexts []string) []Session {
	rng := rand.New(rand.NewPCG(3, 4))
	garbage := make([]byte, 8192)
	for i := range garbage {
		garbage[i] = byte(rng.Uint32())
	}
	flags := be.AppendUint32(nil, ClientFixed|ClientNoZeroes)
	cat := func(b ...[]byte) []byte {
		var out []byte
		for _, x := range b {
			out = append(out, x...)
		}
		return out
	}
	req := func(flags, typ uint16, off, n uint64) []byte { return Req(false, flags, typ, 7, off, n) }
	end := uint64(size)
	ss := []Session{
		{Name: "garbage", Bytes: garbage},
		{Name: "zero bytes then close"},
		{Name: "half the client flags", Bytes: flags[:2]},
		{Name: "unknown client flags", Bytes: be.AppendUint32(nil, 0xfffffff0)},
		{Name: "oldstyle zero flags", Bytes: be.AppendUint32(nil, 0)},
		{Name: "bad option magic", Bytes: cat(flags, garbage[:64])},
		{Name: "option length 4 GiB", Bytes: cat(flags, Opt(OptGo, nil)[:12], be.AppendUint32(nil, 0xffffffff))},
		{Name: "export name 1 GiB", Bytes: cat(flags, Opt(OptExportName, nil)[:12], be.AppendUint32(nil, 1<<30), garbage)},
		{Name: "option 900 KiB (too big, discarded)", Bytes: cat(flags, Opt(OptList, make([]byte, 900<<10)))},
		{Name: "unknown options", Bytes: cat(flags, Opt(0x7fff, garbage[:100]), Opt(0xffffffff, nil), Opt(OptAbort, nil))},
		{Name: "meta context query count 4 G", Bytes: cat(flags, Opt(OptStructured, nil), Opt(OptSetMeta, cat(be.AppendUint32(nil, 0), be.AppendUint32(nil, 0xffffffff), garbage[:64])))},
		{Name: "meta context name length 4 GiB", Bytes: cat(flags, Opt(OptStructured, nil), Opt(OptSetMeta, cat(be.AppendUint32(nil, 0), be.AppendUint32(nil, 1), be.AppendUint32(nil, 0xffffffff))))},
		{Name: "1024 meta context queries", Bytes: cat(flags, Opt(OptStructured, nil), Opt(OptSetMeta, MetaData(slices.Repeat([]string{string(bytes.Repeat([]byte("q"), 60))}, 1024)...)))},
		{Name: "go with info count 65535", Bytes: cat(flags, Opt(OptGo, cat(be.AppendUint32(nil, 0), be.AppendUint16(nil, 0xffff))))},
		{Name: "starttls then garbage", Bytes: cat(flags, Opt(OptStartTLS, nil), garbage[:300])},
		{Name: "disconnect mid-option", Bytes: cat(flags, Opt(OptList, nil)[:10])},
		{Name: "bad request magic", Handshake: true, Bytes: garbage[:28]},
		{Name: "read 4 GiB", Handshake: true, Bytes: req(0, CmdRead, 0, 0xffffffff)},
		{Name: "read past the end", Handshake: true, Bytes: req(0, CmdRead, 1<<62, 4096)},
		{Name: "read offset overflow", Handshake: true, Bytes: req(0, CmdRead, 0xfffffffffffff000, 0x2000)},
		{Name: "unknown commands and flags", Handshake: true, Bytes: cat(req(0, 99, 0, 1), req(0xffff, 0xffff, 0, 0), req(0x8000, CmdRead, 0, 512))},
		{Name: "writes", Handshake: true, Bytes: cat(req(0, CmdWrite, 0, 512), make([]byte, 512), req(0, CmdTrim, 0, 1<<20), req(0, CmdWriteZeroes, 0, 1<<20))},
		{Name: "write claiming 4 GiB payload", Handshake: true, Bytes: cat(req(0, CmdWrite, 0, 0xffffffff), garbage)},
		{Name: "half a request", Handshake: true, Bytes: req(0, CmdRead, 0, 512)[:13]},
		{Name: "block status of 4 GiB at the end", Handshake: true, Bytes: req(0, CmdBlockStatus, end-1, 0xffffffff)},
		{Name: "abrupt close mid-reply", Handshake: true, Bytes: bytes.Repeat(req(0, CmdRead, 0, uint64(min(size, 32<<20))), 16), ReadSome: 100 << 10},
		{Name: "close with reads in flight", Handshake: true, Bytes: bytes.Repeat(req(0, CmdRead, 0, uint64(min(size, 1<<20))), 64)},
		{Name: "many block status then close", Handshake: true, Bytes: bytes.Repeat(req(0, CmdBlockStatus, 0, uint64(min(size, 1<<30))), 200)},
	}
	for i := range ss {
		if ss[i].Handshake {
			ss[i].Contexts = contexts
		}
	}
	return ss
}

// Play sends one session on a new connection and closes it after at most
// linger (or once the server has closed). Only failures to connect or
// to complete a handshake that should succeed are errors: whatever the
// server answers to the hostile bytes is fine.
func Play(network, addr string, s Session, linger time.Duration) error {
	var c net.Conn
	var err error
	if s.Handshake {
		c, err = Handshake(network, addr, OptStructured, s.Contexts...)
	} else {
		c, err = net.DialTimeout(network, addr, 5*time.Second)
	}
	if err != nil {
		return fmt.Errorf("%s: %w", s.Name, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	done := make(chan struct{})
	go func() {
		defer close(done)
		if s.ReadSome > 0 {
			io.CopyN(io.Discard, c, int64(s.ReadSome))
			c.Close()
			return
		}
		io.Copy(io.Discard, c)
	}()
	c.Write(s.Bytes)
	if s.ReadSome > 0 {
		<-done
		return nil
	}
	if cw, ok := c.(interface{ CloseWrite() error }); ok && !s.Handshake {
		cw.CloseWrite()
	}
	select {
	case <-done:
	case <-time.After(linger):
	}
	return nil
}

// Stall opens a connection in transmission that asks for n reads of
// length bytes and never reads a reply: a slow reader. Close the
// connection to let the server go.
func Stall(network, addr string, n int, length uint64) (net.Conn, error) {
	c, err := Handshake(network, addr, OptStructured)
	if err != nil {
		return nil, err
	}
	go func() {
		for j := 0; j < n; j++ {
			if _, err := c.Write(Req(false, 0, CmdRead, uint64(j), 0, length)); err != nil {
				return
			}
		}
	}()
	return c, nil
}
