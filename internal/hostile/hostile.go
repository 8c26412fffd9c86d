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

	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
)

// maxOptReplySize bounds the option replies Handshake reads.
const maxOptReplySize = 64 << 10

var be = binary.BigEndian

// Opt encodes an option request.
func Opt(opt nbdproto.Option, data []byte) []byte {
	b := nbdproto.OptHeader{Opt: opt, Length: uint32(len(data))}.Append(nil)
	return append(b, data...)
}

// Req encodes a transmission request header (extended: 64-bit length).
func Req(ext bool, flags nbdproto.CmdFlags, typ nbdproto.Command, cookie, off, length uint64) []byte {
	return nbdproto.Request{Flags: flags, Type: typ, Cookie: cookie, Offset: off, Length: length}.Append(nil, ext)
}

// GoData is NBD_OPT_GO's data for the default export, no info requests.
func GoData() []byte { return nbdproto.InfoRequest{}.Append(nil) }

// MetaData is NBD_OPT_SET_META_CONTEXT's data for the default export.
func MetaData(names ...string) []byte {
	return nbdproto.MetaContextRequest{Queries: names}.Append(nil)
}

// Handshake connects, negotiates fixed newstyle without zeroes, the mode
// option (0, nbdproto.OptStructuredReply or nbdproto.OptExtendedHeaders)
// and contexts, then NBD_OPT_GO
// for the default export. It returns the connection in transmission.
func Handshake(network, addr string, mode nbdproto.Option, contexts ...string) (net.Conn, error) {
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
	if be.Uint64(hello[:]) != nbdproto.NBDMagic || be.Uint64(hello[8:]) != nbdproto.OptsMagic {
		c.Close()
		return nil, errors.New("bad greeting")
	}
	b := be.AppendUint32(nil, nbdproto.ClientFixedNewstyle|nbdproto.ClientNoZeroes)
	n := 1
	if mode != 0 {
		b = append(b, Opt(mode, nil)...)
		n++
	}
	if len(contexts) > 0 {
		b = append(b, Opt(nbdproto.OptSetMetaContext, MetaData(contexts...))...)
		n++
	}
	b = append(b, Opt(nbdproto.OptGo, GoData())...)
	if _, err := c.Write(b); err != nil {
		c.Close()
		return nil, err
	}
	for i := 0; i < n; {
		var hb [nbdproto.OptReplyHeaderLen]byte
		if _, err := io.ReadFull(r, hb[:]); err != nil {
			c.Close()
			return nil, err
		}
		h, err := nbdproto.DecodeOptReply(hb[:])
		if err != nil {
			c.Close()
			return nil, errors.New("bad option reply magic")
		}
		typ, length := h.Type, h.Length
		if length > maxOptReplySize {
			c.Close()
			return nil, fmt.Errorf("option reply of %d bytes", length)
		}
		if _, err := io.CopyN(io.Discard, r, int64(length)); err != nil {
			c.Close()
			return nil, err
		}
		switch typ {
		case nbdproto.RepServer, nbdproto.RepInfo, nbdproto.RepMetaContext: // more to come
			continue
		case nbdproto.RepAck:
			i++
		default:
			c.Close()
			return nil, fmt.Errorf("option %d refused: reply %#x", i, uint32(typ))
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
	flags := be.AppendUint32(nil, nbdproto.ClientFixedNewstyle|nbdproto.ClientNoZeroes)
	cat := func(b ...[]byte) []byte {
		var out []byte
		for _, x := range b {
			out = append(out, x...)
		}
		return out
	}
	req := func(flags nbdproto.CmdFlags, typ nbdproto.Command, off, n uint64) []byte {
		return Req(false, flags, typ, 7, off, n)
	}
	end := uint64(size)
	ss := []Session{
		{Name: "garbage", Bytes: garbage},
		{Name: "zero bytes then close"},
		{Name: "half the client flags", Bytes: flags[:2]},
		{Name: "unknown client flags", Bytes: be.AppendUint32(nil, 0xfffffff0)},
		{Name: "oldstyle zero flags", Bytes: be.AppendUint32(nil, 0)},
		{Name: "bad option magic", Bytes: cat(flags, garbage[:64])},
		{Name: "option length 4 GiB", Bytes: cat(flags, Opt(nbdproto.OptGo, nil)[:12], be.AppendUint32(nil, 0xffffffff))},
		{Name: "export name 1 GiB", Bytes: cat(flags, Opt(nbdproto.OptExportName, nil)[:12], be.AppendUint32(nil, 1<<30), garbage)},
		{Name: "option 900 KiB (too big, discarded)", Bytes: cat(flags, Opt(nbdproto.OptList, make([]byte, 900<<10)))},
		{Name: "unknown options", Bytes: cat(flags, Opt(0x7fff, garbage[:100]), Opt(0xffffffff, nil), Opt(nbdproto.OptAbort, nil))},
		{Name: "meta context query count 4 G", Bytes: cat(flags, Opt(nbdproto.OptStructuredReply, nil), Opt(nbdproto.OptSetMetaContext, cat(be.AppendUint32(nil, 0), be.AppendUint32(nil, 0xffffffff), garbage[:64])))},
		{Name: "meta context name length 4 GiB", Bytes: cat(flags, Opt(nbdproto.OptStructuredReply, nil), Opt(nbdproto.OptSetMetaContext, cat(be.AppendUint32(nil, 0), be.AppendUint32(nil, 1), be.AppendUint32(nil, 0xffffffff))))},
		{Name: "1024 meta context queries", Bytes: cat(flags, Opt(nbdproto.OptStructuredReply, nil), Opt(nbdproto.OptSetMetaContext, MetaData(slices.Repeat([]string{string(bytes.Repeat([]byte("q"), 60))}, 1024)...)))},
		{Name: "go with info count 65535", Bytes: cat(flags, Opt(nbdproto.OptGo, cat(be.AppendUint32(nil, 0), be.AppendUint16(nil, 0xffff))))},
		{Name: "starttls then garbage", Bytes: cat(flags, Opt(nbdproto.OptStartTLS, nil), garbage[:300])},
		{Name: "disconnect mid-option", Bytes: cat(flags, Opt(nbdproto.OptList, nil)[:10])},
		{Name: "bad request magic", Handshake: true, Bytes: garbage[:28]},
		{Name: "read 4 GiB", Handshake: true, Bytes: req(0, nbdproto.CmdRead, 0, 0xffffffff)},
		{Name: "read past the end", Handshake: true, Bytes: req(0, nbdproto.CmdRead, 1<<62, 4096)},
		{Name: "read offset overflow", Handshake: true, Bytes: req(0, nbdproto.CmdRead, 0xfffffffffffff000, 0x2000)},
		{Name: "unknown commands and flags", Handshake: true, Bytes: cat(req(0, 99, 0, 1), req(0xffff, 0xffff, 0, 0), req(0x8000, nbdproto.CmdRead, 0, 512))},
		{Name: "writes", Handshake: true, Bytes: cat(req(0, nbdproto.CmdWrite, 0, 512), make([]byte, 512), req(0, nbdproto.CmdTrim, 0, 1<<20), req(0, nbdproto.CmdWriteZeroes, 0, 1<<20))},
		{Name: "write claiming 4 GiB payload", Handshake: true, Bytes: cat(req(0, nbdproto.CmdWrite, 0, 0xffffffff), garbage)},
		{Name: "half a request", Handshake: true, Bytes: req(0, nbdproto.CmdRead, 0, 512)[:13]},
		{Name: "block status of 4 GiB at the end", Handshake: true, Bytes: req(0, nbdproto.CmdBlockStatus, end-1, 0xffffffff)},
		{Name: "abrupt close mid-reply", Handshake: true, Bytes: bytes.Repeat(req(0, nbdproto.CmdRead, 0, uint64(min(size, 32<<20))), 16), ReadSome: 100 << 10},
		{Name: "close with reads in flight", Handshake: true, Bytes: bytes.Repeat(req(0, nbdproto.CmdRead, 0, uint64(min(size, 1<<20))), 64)},
		{Name: "many block status then close", Handshake: true, Bytes: bytes.Repeat(req(0, nbdproto.CmdBlockStatus, 0, uint64(min(size, 1<<30))), 200)},
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
		c, err = Handshake(network, addr, nbdproto.OptStructuredReply, s.Contexts...)
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
	c, err := Handshake(network, addr, nbdproto.OptStructuredReply)
	if err != nil {
		return nil, err
	}
	go func() {
		for j := 0; j < n; j++ {
			if _, err := c.Write(Req(false, 0, nbdproto.CmdRead, uint64(j), 0, length)); err != nil {
				return
			}
		}
	}()
	return c, nil
}
