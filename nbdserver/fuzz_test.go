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
	b := be.AppendUint32(nil, clientFlagFixedNewstyle|clientFlagNoZeroes)
	b = optHeader{opt: modeOpt}.append(b)
	set := metaContextRequest{queries: []string{metactx.BaseAllocation, metactx.AllocationDepth}}.append(nil)
	b = optHeader{opt: OptSetMetaContext, length: uint32(len(set))}.append(b)
	b = append(b, set...)
	list := metaContextRequest{queries: []string{"qemu:"}}.append(nil)
	b = optHeader{opt: OptListMetaContext, length: uint32(len(list))}.append(b)
	b = append(b, list...)
	b = optHeader{opt: OptList}.append(b)
	gr := infoRequest{infos: []uint16{infoName, infoBlockSize}}.append(nil)
	b = optHeader{opt: OptGo, length: uint32(len(gr))}.append(b)
	b = append(b, gr...)
	b = request{typ: CmdRead, cookie: 1, length: 4096}.append(b, ext)
	b = request{typ: CmdBlockStatus, cookie: 2, length: 65536}.append(b, ext)
	if ext {
		p := blockStatusPayload{length: 65536, ids: []uint32{1}}.append(nil)
		b = request{typ: CmdBlockStatus, flags: CmdFlagPayloadLen, cookie: 3, length: uint64(len(p))}.append(b, ext)
		b = append(b, p...)
	}
	b = request{typ: CmdWrite, cookie: 4, length: 8}.append(b, ext)
	b = append(b, make([]byte, 8)...)
	return request{typ: CmdDisc}.append(b, ext)
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
	hello := be.AppendUint64(nil, nbdMagic)
	hello = be.AppendUint64(hello, optsMagic)
	hello = be.AppendUint16(hello, flagFixedNewstyle|flagNoZeroes)
	ack := func(opt Option, typ Reply, data []byte) []byte {
		return append(optReply{opt: opt, typ: typ, length: uint32(len(data))}.append(nil), data...)
	}
	ok := append([]byte{}, hello...)
	ok = append(ok, ack(OptStructuredReply, RepAck, nil)...)
	ok = append(ok, ack(OptSetMetaContext, RepMetaContext, append(be.AppendUint32(nil, 5), metactx.BaseAllocation...))...)
	ok = append(ok, ack(OptSetMetaContext, RepAck, nil)...)
	info := be.AppendUint16(nil, infoExport)
	info = be.AppendUint64(info, 1<<20)
	info = be.AppendUint16(info, FlagHasFlags)
	ok = append(ok, ack(OptGo, RepInfo, info)...)
	ok = append(ok, ack(OptGo, RepAck, nil)...)
	data := appendChunkHeader(nil, modeStructured, replyFlagDone, replyTypeOffsetData, 1, 0, 8+512)
	data = append(be.AppendUint64(data, 0), make([]byte, 512)...)
	bs := appendChunkHeader(nil, modeStructured, replyFlagDone, replyTypeBlockStatus, 2, 0, 12)
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
	f.Add(byte(0), request{typ: CmdRead, cookie: 1, offset: 2, length: 3}.append(nil, false))
	f.Add(byte(1), request{typ: CmdBlockStatus, flags: CmdFlagPayloadLen, length: 12}.append(nil, true))
	f.Add(byte(2), metaContextRequest{export: "x", queries: []string{"qemu:"}}.append(nil))
	f.Add(byte(3), infoRequest{export: "x", infos: []uint16{1, 3}}.append(nil))
	f.Add(byte(4), blockStatusPayload{length: 9, ids: []uint32{1, 2}}.append(nil))
	f.Add(byte(5), appendChunkHeader(nil, modeExtended, 1, 6, 7, 8, 9))
	f.Add(byte(6), []byte{0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0})
	f.Add(byte(7), []byte{0, 0, 0, 22, 0, 2, 'h', 'i'})
	f.Fuzz(func(t *testing.T, kind byte, b []byte) {
		switch kind % 9 {
		case 0, 1:
			ext := kind%9 == 1
			if r, err := decodeRequest(b, ext); err == nil {
				n := requestLen
				if ext {
					n = extendedRequestLen
				}
				if got := r.append(nil, ext); !bytes.Equal(got, b[:n]) {
					t.Fatalf("request re-encodes to %x, want %x", got, b[:n])
				}
			}
		case 2:
			if m, err := decodeMetaContextRequest(b); err == nil && !bytes.Equal(m.append(nil), b) {
				t.Fatal("meta context request does not round-trip")
			}
		case 3:
			if r, err := decodeInfoRequest(b); err == nil && !bytes.Equal(r.append(nil), b) {
				t.Fatal("info request does not round-trip")
			}
		case 4:
			if p, err := decodeBlockStatusPayload(b); err == nil && !bytes.Equal(p.append(nil), b) {
				t.Fatal("block status payload does not round-trip")
			}
		case 5:
			decodeReplyHeader(b)
		case 6, 7:
			decodeBlockStatus(b, kind%9 == 7)
		case 8:
			decodeErrorPayload(b)
			decodeOptHeader(b)
			decodeOptReply(b)
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
