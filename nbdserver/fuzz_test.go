package nbdserver

import (
	"context"
	"io"
	"net"
	"testing"
	"time"

	"github.com/nbdgw/nbdgw/internal/metactx"
	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
)

// validSession is a client byte stream: handshake with the given mode
// option, contexts, GO, then some requests and DISC.
func validSession(modeOpt nbdproto.Option, ext bool) []byte {
	b := be.AppendUint32(nil, nbdproto.ClientFixedNewstyle|nbdproto.ClientNoZeroes)
	b = nbdproto.OptHeader{Opt: modeOpt}.Append(b)
	set := nbdproto.MetaContextRequest{Queries: []string{metactx.BaseAllocation, metactx.AllocationDepth}}.Append(nil)
	b = nbdproto.OptHeader{Opt: nbdproto.OptSetMetaContext, Length: uint32(len(set))}.Append(b)
	b = append(b, set...)
	list := nbdproto.MetaContextRequest{Queries: []string{"qemu:"}}.Append(nil)
	b = nbdproto.OptHeader{Opt: nbdproto.OptListMetaContext, Length: uint32(len(list))}.Append(b)
	b = append(b, list...)
	b = nbdproto.OptHeader{Opt: nbdproto.OptList}.Append(b)
	gr := nbdproto.InfoRequest{Infos: []nbdproto.Info{nbdproto.InfoName, nbdproto.InfoBlockSize}}.Append(nil)
	b = nbdproto.OptHeader{Opt: nbdproto.OptGo, Length: uint32(len(gr))}.Append(b)
	b = append(b, gr...)
	b = nbdproto.Request{Type: nbdproto.CmdRead, Cookie: 1, Length: 4096}.Append(b, ext)
	b = nbdproto.Request{Type: nbdproto.CmdBlockStatus, Cookie: 2, Length: 65536}.Append(b, ext)
	if ext {
		p := nbdproto.BlockStatusPayload{Length: 65536, IDs: []uint32{1}}.Append(nil)
		b = nbdproto.Request{Type: nbdproto.CmdBlockStatus, Flags: nbdproto.CmdFlagPayloadLen, Cookie: 3, Length: uint64(len(p))}.Append(b, ext)
		b = append(b, p...)
	}
	b = nbdproto.Request{Type: nbdproto.CmdWrite, Cookie: 4, Length: 8}.Append(b, ext)
	b = append(b, make([]byte, 8)...)
	return nbdproto.Request{Type: nbdproto.CmdDisc}.Append(b, ext)
}

// FuzzServer feeds arbitrary client bytes to a server connection: option
// haggling and, past it, transmission requests. It must neither panic nor
// hang nor allocate unboundedly.
func FuzzServer(f *testing.F) {
	f.Add(validSession(nbdproto.OptStructuredReply, false))
	f.Add(validSession(nbdproto.OptExtendedHeaders, true))
	f.Add([]byte{0, 0, 0, 1, 'I', 'H', 'A', 'V', 'E', 'O', 'P', 'T', 0, 0, 0, 1, 0, 0, 0, 0})
	f.Add(be.AppendUint32(nil, 3))
	img := rawImage(f, 1<<20)
	srv := NewServer(Config{Exports: []*Export{{Image: img}}, HandshakeTimeout: 5 * time.Second})
	f.Fuzz(func(t *testing.T, in []byte) {
		playStream(t, srv, in)
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
