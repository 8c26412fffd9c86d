package nbdserver

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"

	"github.com/nbdgw/nbdgw/nbdserver/nbdclient"
	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
	"github.com/nbdgw/nbdgw/qcow2"
)

// writableImage creates an empty qcow2 image of size bytes (64 KiB
// clusters) and opens it writable.
func writableImage(t testing.TB, size string) (*qcow2.Image, string) {
	t.Helper()
	needTool(t, "qemu-img")
	p := filepath.Join(t.TempDir(), "w.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", p, size)
	img, err := qcow2.Open(p, qcow2.Options{Writable: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() })
	return img, p
}

func TestWritableFlags(t *testing.T) {
	img, _ := writableImage(t, "1M")
	_, uri := startServer(t, Config{Exports: []*Export{{Name: "rw", Image: img, Writable: true}, {Name: "ro", Image: img}}})
	writeFlags := nbdproto.FlagSendFlush | nbdproto.FlagSendFUA | nbdproto.FlagSendTrim | nbdproto.FlagSendWriteZeroes | nbdproto.FlagSendFastZero | nbdproto.FlagCanMultiConn
	for _, tc := range []struct {
		export string
		ro     bool
	}{{"rw", false}, {"ro", true}} {
		for _, m := range modes {
			c, err := nbdclient.Dial(context.Background(), uri, nbdclient.Options{ExportName: tc.export, StructuredReplies: m.want >= nbdproto.ModeStructured, ExtendedHeaders: m.want == nbdproto.ModeExtended})
			if err != nil {
				t.Fatal(err)
			}
			f := c.TransmissionFlags()
			c.Close()
			if got := f&nbdproto.FlagReadOnly != 0; got != tc.ro {
				t.Errorf("%s/%s: READ_ONLY %v, want %v (flags %v)", tc.export, m.name, got, tc.ro, f)
			}
			want := writeFlags
			if tc.ro {
				want = nbdproto.FlagSendFlush | nbdproto.FlagCanMultiConn
			}
			if f&writeFlags != want {
				t.Errorf("%s/%s: flags %v, want %v among %v", tc.export, m.name, f&writeFlags, want, writeFlags)
			}
		}
	}
}

// TestWriteCommands sends every write command, valid and not, in each
// reply mode, and checks the errors and the content against a shadow.
func TestWriteCommands(t *testing.T) {
	const size = 1 << 20
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			img, _ := writableImage(t, "1M")
			_, uri := startServer(t, Config{Exports: []*Export{{Image: img, Writable: true}}})
			rc := dialRaw(t, uri)
			switch m.want {
			case nbdproto.ModeStructured:
				rc.final(nbdproto.OptStructuredReply, nil)
			case nbdproto.ModeExtended:
				rc.final(nbdproto.OptExtendedHeaders, nil)
			}
			rc.goExport()
			ext := m.want == nbdproto.ModeExtended
			shadow := make([]byte, size)
			data := func(n int, v byte) []byte { return bytes.Repeat([]byte{v}, n) }
			tests := []struct {
				req     nbdproto.Request
				payload []byte
				errno   nbdproto.Errno
				apply   func() // the change to the shadow on success
			}{
				{nbdproto.Request{Type: nbdproto.CmdWrite, Offset: 100, Length: 3000}, data(3000, 0xa1), 0, func() { copy(shadow[100:], data(3000, 0xa1)) }},
				{nbdproto.Request{Type: nbdproto.CmdWrite, Flags: nbdproto.CmdFlagFUA, Offset: 65530, Length: 70000}, data(70000, 0xa2), 0, func() { copy(shadow[65530:], data(70000, 0xa2)) }},
				{nbdproto.Request{Type: nbdproto.CmdWrite, Offset: size - 10, Length: 10}, data(10, 0xa3), 0, func() { copy(shadow[size-10:], data(10, 0xa3)) }},
				{nbdproto.Request{Type: nbdproto.CmdWrite, Offset: size - 10, Length: 11}, data(11, 0xee), nbdproto.ENOSPC, nil},
				{nbdproto.Request{Type: nbdproto.CmdWrite, Offset: size + 512, Length: 512}, data(512, 0xee), nbdproto.ENOSPC, nil},
				{nbdproto.Request{Type: nbdproto.CmdWrite, Flags: nbdproto.CmdFlagDF, Length: 512}, data(512, 0xee), nbdproto.EINVAL, nil},
				{nbdproto.Request{Type: nbdproto.CmdWrite, Flags: nbdproto.CmdFlagNoHole, Length: 512}, data(512, 0xee), nbdproto.EINVAL, nil},
				{nbdproto.Request{Type: nbdproto.CmdWrite, Length: 0}, nil, 0, nil},
				{nbdproto.Request{Type: nbdproto.CmdWriteZeroes, Offset: 200, Length: 100}, nil, 0, func() { clear(shadow[200:300]) }},
				{nbdproto.Request{Type: nbdproto.CmdWriteZeroes, Flags: nbdproto.CmdFlagNoHole | nbdproto.CmdFlagFUA, Offset: 66000, Length: 1000}, nil, 0, func() { clear(shadow[66000:67000]) }},
				// Unaligned: zeroing would write bytes, so FAST_ZERO refuses
				// without changing anything.
				{nbdproto.Request{Type: nbdproto.CmdWrite, Offset: 300000, Length: 1000}, data(1000, 0xa4), 0, func() { copy(shadow[300000:], data(1000, 0xa4)) }},
				{nbdproto.Request{Type: nbdproto.CmdWriteZeroes, Flags: nbdproto.CmdFlagFastZero, Offset: 300100, Length: 10}, nil, nbdproto.ENOTSUP, nil},
				{nbdproto.Request{Type: nbdproto.CmdWriteZeroes, Flags: nbdproto.CmdFlagFastZero, Offset: 0, Length: 128 << 10}, nil, 0, func() { clear(shadow[:128<<10]) }},
				{nbdproto.Request{Type: nbdproto.CmdWriteZeroes, Offset: size - 1, Length: 2}, nil, nbdproto.ENOSPC, nil},
				{nbdproto.Request{Type: nbdproto.CmdWriteZeroes, Flags: nbdproto.CmdFlagDF, Length: 2}, nil, nbdproto.EINVAL, nil},
				// Trim releases whole clusters only (then reading zeroes).
				{nbdproto.Request{Type: nbdproto.CmdWrite, Offset: 512 << 10, Length: 256 << 10}, data(256<<10, 0xa5), 0, func() { copy(shadow[512<<10:], data(256<<10, 0xa5)) }},
				{nbdproto.Request{Type: nbdproto.CmdTrim, Flags: nbdproto.CmdFlagFUA, Offset: 512<<10 + 1, Length: 192 << 10}, nil, 0, func() { clear(shadow[576<<10 : 704<<10]) }},
				{nbdproto.Request{Type: nbdproto.CmdTrim, Offset: size - 1, Length: 2}, nil, nbdproto.EINVAL, nil},
				{nbdproto.Request{Type: nbdproto.CmdTrim, Flags: nbdproto.CmdFlagNoHole, Length: 2}, nil, nbdproto.EINVAL, nil},
				{nbdproto.Request{Type: nbdproto.CmdFlush}, nil, 0, nil},
				{nbdproto.Request{Type: nbdproto.CmdFlush, Flags: nbdproto.CmdFlagFUA}, nil, nbdproto.EINVAL, nil},
			}
			for i, tc := range tests {
				tc.req.Cookie = uint64(100 + i)
				rc.write(append(tc.req.Append(nil, ext), tc.payload...))
				h, p := rc.reply()
				errno := replyErrno(t, tc.req.Type, h, p)
				if h.Cookie != tc.req.Cookie || errno != tc.errno {
					t.Errorf("#%d %v flags %#x at %d+%d: cookie %d errno %v, want %d %v", i, tc.req.Type, tc.req.Flags, tc.req.Offset, tc.req.Length, h.Cookie, errno, tc.req.Cookie, tc.errno)
				}
				if errno == 0 && tc.apply != nil {
					tc.apply()
				}
			}
			got := make([]byte, size)
			if _, err := img.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, shadow) {
				t.Errorf("image differs from the shadow at %s", diffAt(got, shadow))
			}
		})
	}
}

func diffAt(a, b []byte) string {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return fmt.Sprintf("offset %d (%#x, want %#x)", i, a[i], b[i])
		}
	}
	return fmt.Sprintf("length %d vs %d", len(a), len(b))
}

// TestClientWrites drives the client's write methods and checks the
// result with client reads and through the engine, and that a read-only
// export refuses them with EPERM.
func TestClientWrites(t *testing.T) {
	img, _ := writableImage(t, "4M")
	_, uri := startServer(t, Config{Exports: []*Export{{Name: "rw", Image: img, Writable: true}, {Name: "ro", Image: img}}})
	c, err := nbdclient.Dial(context.Background(), uri, nbdclient.Options{ExportName: "rw", StructuredReplies: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	shadow := make([]byte, 4<<20)
	big := bytes.Repeat([]byte("0123456789abcdef"), 3<<16) // 3 MiB
	if n, err := c.WriteAt(big, 12345); err != nil || n != len(big) {
		t.Fatalf("WriteAt: %d, %v", n, err)
	}
	copy(shadow[12345:], big)
	if err := c.WriteFlags([]byte("fua"), 7, nbdproto.CmdFlagFUA); err != nil {
		t.Fatal(err)
	}
	copy(shadow[7:], "fua")
	if err := c.WriteZeroes(1<<20, 1<<20, nbdproto.CmdFlagNoHole); err != nil {
		t.Fatal(err)
	}
	clear(shadow[1<<20 : 2<<20])
	if err := c.Trim(3<<20, 1<<20, 0); err != nil { // up to the end: whole clusters
		t.Fatal(err)
	}
	clear(shadow[3<<20:])
	var se *nbdproto.ServerError
	if err := c.WriteZeroes(5, 5, nbdproto.CmdFlagFastZero); !errors.As(err, &se) || se.Errno != nbdproto.ENOTSUP {
		t.Errorf("unaligned fast zero: %v, want ENOTSUP", err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.WriteAt(make([]byte, 2), 4<<20-1); err == nil {
		t.Error("client wrote past the end of the export")
	}
	got := make([]byte, len(shadow))
	if _, err := c.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, shadow) {
		t.Errorf("read back differs at %s", diffAt(got, shadow))
	}

	ro, err := nbdclient.Dial(context.Background(), uri, nbdclient.Options{ExportName: "ro"})
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	for name, f := range map[string]func() error{
		"write":        func() error { _, err := ro.WriteAt([]byte("x"), 0); return err },
		"write-zeroes": func() error { return ro.WriteZeroes(0, 4096, 0) },
		"trim":         func() error { return ro.Trim(0, 65536, 0) },
	} {
		if err := f(); !errors.As(err, &se) || se.Errno != nbdproto.EPERM {
			t.Errorf("read-only %s: %v, want EPERM", name, err)
		}
	}
	if err := ro.Flush(); err != nil {
		t.Errorf("read-only flush: %v", err)
	}
	if _, err := ro.ReadAt(got, 0); err != nil || !bytes.Equal(got, shadow) {
		t.Errorf("read-only export after refused writes: %v, differs: %v", err, !bytes.Equal(got, shadow))
	}
}

// TestReadsAreSnapshots races reads against writes, zero writes and
// trims of the same clusters on other connections. Every write sets two
// whole clusters to one byte value, so a read that mixed two instants
// (say a block status taken before a write and data read after it, or a
// host cluster reused after a trim) would see two values.
func TestReadsAreSnapshots(t *testing.T) {
	img, _ := writableImage(t, "1M")
	_, uri := startServer(t, Config{Exports: []*Export{{Image: img, Writable: true}}})
	const span = 128 << 10
	const rounds = 300
	dial := func(structured bool) *nbdclient.Client {
		c, err := nbdclient.Dial(context.Background(), uri, nbdclient.Options{StructuredReplies: structured})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	w := dial(false)
	readers := []*nbdclient.Client{dial(true), dial(false)}
	done := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer close(done)
		buf := make([]byte, span)
		for i := range rounds {
			var err error
			off := int64(i%4) * span
			switch i % 5 {
			case 3:
				err = w.Trim(off, span, 0)
			case 4:
				err = w.WriteZeroes(off, span, 0)
				if err == nil {
					err = w.Flush()
				}
			default:
				for j := range buf {
					buf[j] = byte(i%250 + 1)
				}
				_, err = w.WriteAt(buf, off)
			}
			if err != nil {
				errs <- fmt.Errorf("round %d: %w", i, err)
				return
			}
		}
	}()
	for ri, r := range readers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, span)
			for i := 0; ; i++ {
				select {
				case <-done:
					return
				default:
				}
				off := int64(i%4) * span
				if _, err := r.ReadAt(buf, off); err != nil {
					errs <- err
					return
				}
				for j := range buf {
					if buf[j] != buf[0] {
						errs <- fmt.Errorf("reader %d: read at %d is torn: byte %d is %#x, byte 0 is %#x", ri, off, j, buf[j], buf[0])
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestHostileWrites: oversized and truncated writes to a writable export
// drop only their own connection and change nothing.
func TestHostileWrites(t *testing.T) {
	img, _ := writableImage(t, "4M")
	_, uri := startServer(t, Config{Exports: []*Export{{Image: img, Writable: true}}, Logf: func(string, ...any) {}})
	before := make([]byte, 4<<20)
	if _, err := img.ReadAt(before, 0); err != nil {
		t.Fatal(err)
	}
	for _, tc := range map[string]struct {
		ext  bool
		req  nbdproto.Request
		data []byte
	}{
		"huge write":          {true, nbdproto.Request{Type: nbdproto.CmdWrite, Length: 1 << 40}, nil},
		"write above limit":   {false, nbdproto.Request{Type: nbdproto.CmdWrite, Length: 32<<20 + 1}, make([]byte, 1<<20)},
		"half a write":        {false, nbdproto.Request{Type: nbdproto.CmdWrite, Length: 1 << 20}, make([]byte, 4096)},
		"half a write (ext)":  {true, nbdproto.Request{Type: nbdproto.CmdWrite, Length: 1 << 20}, bytes.Repeat([]byte{7}, 65536)},
		"write then hang up":  {false, nbdproto.Request{Type: nbdproto.CmdWrite, Offset: 1 << 20, Length: 8}, nil},
		"zeroes past the end": {true, nbdproto.Request{Type: nbdproto.CmdWriteZeroes, Offset: 1 << 62, Length: 1 << 62}, nil},
	} {
		rc := dialRaw(t, uri)
		if tc.ext {
			rc.final(nbdproto.OptExtendedHeaders, nil)
		}
		rc.goExport()
		rc.c.Write(append(tc.req.Append(nil, tc.ext), tc.data...)) // may fail: the server hangs up
		rc.c.Close()
	}
	c, err := nbdclient.Dial(context.Background(), uri, nbdclient.Options{StructuredReplies: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(before))
	if _, err := c.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, before) {
		t.Errorf("hostile writes changed the export at %s", diffAt(got, before))
	}
}
