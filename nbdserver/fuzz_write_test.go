package nbdserver

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
	"github.com/nbdgw/nbdgw/qcow2"
)

// writeSession is validSession followed by every write command.
func writeSession(modeOpt nbdproto.Option, ext bool) []byte {
	b := validSession(modeOpt, ext)
	b = b[:len(b)-len(nbdproto.Request{Type: nbdproto.CmdDisc}.Append(nil, ext))]
	b = nbdproto.Request{Type: nbdproto.CmdWrite, Flags: nbdproto.CmdFlagFUA, Cookie: 5, Offset: 4095, Length: 3}.Append(b, ext)
	b = append(b, 1, 2, 3)
	b = nbdproto.Request{Type: nbdproto.CmdWriteZeroes, Flags: nbdproto.CmdFlagNoHole | nbdproto.CmdFlagFastZero, Cookie: 6, Offset: 512, Length: 8192}.Append(b, ext)
	b = nbdproto.Request{Type: nbdproto.CmdTrim, Cookie: 7, Offset: 0, Length: 1 << 20}.Append(b, ext)
	b = nbdproto.Request{Type: nbdproto.CmdFlush, Cookie: 8}.Append(b, ext)
	return nbdproto.Request{Type: nbdproto.CmdDisc}.Append(b, ext)
}

// FuzzWritableServer is FuzzServer on a writable export (a raw file).
func FuzzWritableServer(f *testing.F) {
	f.Add(writeSession(nbdproto.OptStructuredReply, false))
	f.Add(writeSession(nbdproto.OptExtendedHeaders, true))
	p := filepath.Join(f.TempDir(), "w.raw")
	if err := os.WriteFile(p, make([]byte, 1<<20), 0o644); err != nil {
		f.Fatal(err)
	}
	img, err := qcow2.Open(p, qcow2.Options{Format: "raw", Writable: true})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { img.Close() })
	srv := NewServer(Config{Exports: []*Export{{Image: img, Writable: true}}, HandshakeTimeout: 5 * time.Second})
	f.Fuzz(func(t *testing.T, in []byte) {
		playStream(t, srv, in)
	})
}
