package nbdclient

import (
	"context"
	"io"
	"net"
	"testing"
	"time"

	"github.com/nbdgw/nbdgw/internal/metactx"
	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
)

// FuzzClient feeds arbitrary server bytes to the client: handshake, then a
// read and a block status.
func FuzzClient(f *testing.F) {
	hello := be.AppendUint64(nil, nbdproto.NBDMagic)
	hello = be.AppendUint64(hello, nbdproto.OptsMagic)
	hello = be.AppendUint16(hello, nbdproto.HandshakeFixedNewstyle|nbdproto.HandshakeNoZeroes)
	ack := func(opt nbdproto.Option, typ nbdproto.Reply, data []byte) []byte {
		return append(nbdproto.OptReply{Opt: opt, Type: typ, Length: uint32(len(data))}.Append(nil), data...)
	}
	ok := append([]byte{}, hello...)
	ok = append(ok, ack(nbdproto.OptStructuredReply, nbdproto.RepAck, nil)...)
	ok = append(ok, ack(nbdproto.OptSetMetaContext, nbdproto.RepMetaContext, append(be.AppendUint32(nil, 5), metactx.BaseAllocation...))...)
	ok = append(ok, ack(nbdproto.OptSetMetaContext, nbdproto.RepAck, nil)...)
	info := be.AppendUint16(nil, uint16(nbdproto.InfoExport))
	info = be.AppendUint64(info, 1<<20)
	info = be.AppendUint16(info, uint16(nbdproto.FlagHasFlags))
	ok = append(ok, ack(nbdproto.OptGo, nbdproto.RepInfo, info)...)
	ok = append(ok, ack(nbdproto.OptGo, nbdproto.RepAck, nil)...)
	data := nbdproto.AppendChunkHeader(nil, nbdproto.ModeStructured, nbdproto.ReplyFlagDone, nbdproto.ReplyTypeOffsetData, 1, 0, 8+512)
	data = append(be.AppendUint64(data, 0), make([]byte, 512)...)
	bs := nbdproto.AppendChunkHeader(nil, nbdproto.ModeStructured, nbdproto.ReplyFlagDone, nbdproto.ReplyTypeBlockStatus, 2, 0, 12)
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
		c, err := New(ctx, cli, Options{StructuredReplies: true, MetaContexts: []string{metactx.BaseAllocation}})
		if err != nil {
			return
		}
		defer c.Close()
		buf := make([]byte, min(c.Size(), 4096))
		c.ReadAt(buf, 0)
		c.BlockStatus(ctx, metactx.BaseAllocation, 0, c.Size(), func(_, _ int64, _ uint32) error { return nil })
	})
}
