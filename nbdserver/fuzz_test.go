package nbdserver

import (
	"bytes"
	"context"
	"io"
	"net"
	"testing"
	"time"

	"github.com/nbdgw/nbdgw/metactx"
)

// validSession is a client byte stream: handshake with the given mode
// option, contexts, GO, then some requests and DISC.
func validSession(modeOpt Option, ext bool) []byte {
	b := be.AppendUint32(nil, ClientFixedNewstyle|ClientNoZeroes)
	b = OptHeader{Opt: modeOpt}.Append(b)
	set := MetaContextRequest{Queries: []string{metactx.BaseAllocation, metactx.AllocationDepth}}.Append(nil)
	b = OptHeader{Opt: OptSetMetaContext, Length: uint32(len(set))}.Append(b)
	b = append(b, set...)
	list := MetaContextRequest{Queries: []string{"qemu:"}}.Append(nil)
	b = OptHeader{Opt: OptListMetaContext, Length: uint32(len(list))}.Append(b)
	b = append(b, list...)
	b = OptHeader{Opt: OptList}.Append(b)
	gr := InfoRequest{Infos: []uint16{InfoName, InfoBlockSize}}.Append(nil)
	b = OptHeader{Opt: OptGo, Length: uint32(len(gr))}.Append(b)
	b = append(b, gr...)
	b = Request{Type: CmdRead, Cookie: 1, Length: 4096}.Append(b, ext)
	b = Request{Type: CmdBlockStatus, Cookie: 2, Length: 65536}.Append(b, ext)
	if ext {
		p := BlockStatusPayload{Length: 65536, IDs: []uint32{1}}.Append(nil)
		b = Request{Type: CmdBlockStatus, Flags: CmdFlagPayloadLen, Cookie: 3, Length: uint64(len(p))}.Append(b, ext)
		b = append(b, p...)
	}
	b = Request{Type: CmdWrite, Cookie: 4, Length: 8}.Append(b, ext)
	b = append(b, make([]byte, 8)...)
	return Request{Type: CmdDisc}.Append(b, ext)
}

// FuzzServer feeds arbitrary client bytes to a server connection: option
// haggling and, past it, transmission requests. It must neither panic nor
// hang nor allocate unboundedly.
func FuzzServer(f *testing.F) {
	f.Add(validSession(OptStructuredReply, false))
	f.Add(validSession(OptExtendedHeaders, true))
	f.Add([]byte{0, 0, 0, 1, 'I', 'H', 'A', 'V', 'E', 'O', 'P', 'T', 0, 0, 0, 1, 0, 0, 0, 0})
	f.Add(be.AppendUint32(nil, 3))
	img := rawImage(f, 1<<20)
	srv := NewServer(Config{Exports: []*Export{{Image: img}}, HandshakeTimeout: 5 * time.Second})
	f.Fuzz(func(t *testing.T, in []byte) {
		playStream(t, srv, in)
	})
}

// FuzzClient feeds arbitrary server bytes to the client: handshake, then a
// read and a block status.
func FuzzClient(f *testing.F) {
	hello := be.AppendUint64(nil, NBDMagic)
	hello = be.AppendUint64(hello, OptsMagic)
	hello = be.AppendUint16(hello, HandshakeFixedNewstyle|HandshakeNoZeroes)
	ack := func(opt Option, typ Reply, data []byte) []byte {
		return append(OptReply{Opt: opt, Type: typ, Length: uint32(len(data))}.Append(nil), data...)
	}
	ok := append([]byte{}, hello...)
	ok = append(ok, ack(OptStructuredReply, RepAck, nil)...)
	ok = append(ok, ack(OptSetMetaContext, RepMetaContext, append(be.AppendUint32(nil, 5), metactx.BaseAllocation...))...)
	ok = append(ok, ack(OptSetMetaContext, RepAck, nil)...)
	info := be.AppendUint16(nil, InfoExport)
	info = be.AppendUint64(info, 1<<20)
	info = be.AppendUint16(info, FlagHasFlags)
	ok = append(ok, ack(OptGo, RepInfo, info)...)
	ok = append(ok, ack(OptGo, RepAck, nil)...)
	data := AppendChunkHeader(nil, ModeStructured, ReplyFlagDone, ReplyTypeOffsetData, 1, 0, 8+512)
	data = append(be.AppendUint64(data, 0), make([]byte, 512)...)
	bs := AppendChunkHeader(nil, ModeStructured, ReplyFlagDone, ReplyTypeBlockStatus, 2, 0, 12)
	bs = be.AppendUint32(bs, 5)
	bs = be.AppendUint32(bs, 1<<20)
	bs = be.AppendUint32(bs, 3)
	f.Add(append(append(ok, data...), bs...))
	f.Add(hello)
	f.Fuzz(func(t *testing.T, in []byte) {
		cli, sc := net.Pipe()
		go io.Copy(io.Discard, sc)
		go func() { sc.Write(in); sc.Close() }()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c, err := NewClient(ctx, cli, ClientOptions{StructuredReplies: true, MetaContexts: []string{metactx.BaseAllocation}})
		if err != nil {
			return
		}
		defer c.Close()
		buf := make([]byte, min(c.Size(), 4096))
		c.ReadAt(buf, 0)
		c.BlockStatus(ctx, metactx.BaseAllocation, 0, c.Size(), func(_, _ int64, _ uint32) error { return nil })
	})
}

// FuzzDecode runs every decoder on arbitrary bytes and checks that what
// decodes re-encodes to the same bytes.
func FuzzDecode(f *testing.F) {
	f.Add(byte(0), Request{Type: CmdRead, Cookie: 1, Offset: 2, Length: 3}.Append(nil, false))
	f.Add(byte(1), Request{Type: CmdBlockStatus, Flags: CmdFlagPayloadLen, Length: 12}.Append(nil, true))
	f.Add(byte(2), MetaContextRequest{Export: "x", Queries: []string{"qemu:"}}.Append(nil))
	f.Add(byte(3), InfoRequest{Export: "x", Infos: []uint16{1, 3}}.Append(nil))
	f.Add(byte(4), BlockStatusPayload{Length: 9, IDs: []uint32{1, 2}}.Append(nil))
	f.Add(byte(5), AppendChunkHeader(nil, ModeExtended, 1, 6, 7, 8, 9))
	f.Add(byte(6), []byte{0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0})
	f.Add(byte(7), []byte{0, 0, 0, 22, 0, 2, 'h', 'i'})
	f.Fuzz(func(t *testing.T, kind byte, b []byte) {
		switch kind % 9 {
		case 0, 1:
			ext := kind%9 == 1
			if r, err := DecodeRequest(b, ext); err == nil {
				n := RequestLen
				if ext {
					n = ExtendedRequestLen
				}
				if got := r.Append(nil, ext); !bytes.Equal(got, b[:n]) {
					t.Fatalf("request re-encodes to %x, want %x", got, b[:n])
				}
			}
		case 2:
			if m, err := DecodeMetaContextRequest(b); err == nil && !bytes.Equal(m.Append(nil), b) {
				t.Fatal("meta context request does not round-trip")
			}
		case 3:
			if r, err := DecodeInfoRequest(b); err == nil && !bytes.Equal(r.Append(nil), b) {
				t.Fatal("info request does not round-trip")
			}
		case 4:
			if p, err := DecodeBlockStatusPayload(b); err == nil && !bytes.Equal(p.Append(nil), b) {
				t.Fatal("block status payload does not round-trip")
			}
		case 5:
			DecodeReplyHeader(b)
		case 6, 7:
			DecodeBlockStatus(b, kind%9 == 7)
		case 8:
			DecodeErrorPayload(b)
			DecodeOptHeader(b)
			DecodeOptReply(b)
		}
	})
}

// FuzzParseURI checks that URI parsing never panics and that what parses
// has a network and an address.
func FuzzParseURI(f *testing.F) {
	for _, s := range []string{"nbd://host:1234/exp", "nbds+unix:///e?socket=/s&tls-certificates=/d", "nbd://[::1]/", "nbd+unix://?socket=%00abs"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		u, err := ParseURI(s)
		if err == nil && (u.Network == "" || u.Address == "") {
			t.Fatalf("%q parsed to %+v", s, u)
		}
	})
}

// playStream feeds one connection of srv the client bytes in, drops what
// the server answers, and fails if the server does not let go of the
// connection once the client has closed it.
func playStream(t *testing.T, srv *Server, in []byte) {
	cli, sc := net.Pipe()
	done := make(chan struct{})
	go func() { srv.ServeConn(context.Background(), sc); close(done) }()
	go io.Copy(io.Discard, cli)
	cli.SetWriteDeadline(time.Now().Add(5 * time.Second))
	cli.Write(in)
	cli.Close()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("server hangs")
	}
}
