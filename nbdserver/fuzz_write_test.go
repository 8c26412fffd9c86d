package nbdserver

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nbdgw/nbdgw/qcow2"
)

// writeSession is validSession followed by every write command.
func writeSession(modeOpt Option, ext bool) []byte {
	b := validSession(modeOpt, ext)
	b = b[:len(b)-len(request{typ: CmdDisc}.append(nil, ext))]
	b = request{typ: CmdWrite, flags: CmdFlagFUA, cookie: 5, offset: 4095, length: 3}.append(b, ext)
	b = append(b, 1, 2, 3)
	b = request{typ: CmdWriteZeroes, flags: CmdFlagNoHole | CmdFlagFastZero, cookie: 6, offset: 512, length: 8192}.append(b, ext)
	b = request{typ: CmdTrim, cookie: 7, offset: 0, length: 1 << 20}.append(b, ext)
	b = request{typ: CmdFlush, cookie: 8}.append(b, ext)
	return request{typ: CmdDisc}.append(b, ext)
}

// FuzzWritableServer is FuzzServer on a writable export (a raw file).
func FuzzWritableServer(f *testing.F) {
	f.Add(writeSession(OptStructuredReply, false))
	f.Add(writeSession(OptExtendedHeaders, true))
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
