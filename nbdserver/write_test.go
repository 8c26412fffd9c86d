package nbdserver

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"

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
	writeFlags := uint16(FlagSendFlush | FlagSendFUA | FlagSendTrim | FlagSendWriteZeroes | FlagSendFastZero | FlagCanMultiConn)
	for _, tc := range []struct {
		export string
		ro     bool
	}{{"rw", false}, {"ro", true}} {
		for _, m := range modes {
			c, err := Dial(context.Background(), uri, ClientOptions{ExportName: tc.export, StructuredReplies: m.want >= modeStructured, ExtendedHeaders: m.want == modeExtended})
			if err != nil {
				t.Fatal(err)
			}
			f := c.TransmissionFlags()
			c.Close()
			if got := f&FlagReadOnly != 0; got != tc.ro {
				t.Errorf("%s/%s: READ_ONLY %v, want %v (flags %#x)", tc.export, m.name, got, tc.ro, f)
			}
			want := writeFlags
			if tc.ro {
				want = FlagSendFlush | FlagCanMultiConn
			}
			if f&writeFlags != want {
				t.Errorf("%s/%s: flags %#x, want %#x among %#x", tc.export, m.name, f&writeFlags, want, writeFlags)
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
			case modeStructured:
				rc.final(OptStructuredReply, nil)
			case modeExtended:
				rc.final(OptExtendedHeaders, nil)
			}
			rc.goExport()
			ext := m.want == modeExtended
			shadow := make([]byte, size)
			data := func(n int, v byte) []byte { return bytes.Repeat([]byte{v}, n) }
			tests := []struct {
				req     request
				payload []byte
				errno   Errno
				apply   func() // the change to the shadow on success
			}{
				{request{typ: CmdWrite, offset: 100, length: 3000}, data(3000, 0xa1), 0, func() { copy(shadow[100:], data(3000, 0xa1)) }},
				{request{typ: CmdWrite, flags: CmdFlagFUA, offset: 65530, length: 70000}, data(70000, 0xa2), 0, func() { copy(shadow[65530:], data(70000, 0xa2)) }},
				{request{typ: CmdWrite, offset: size - 10, length: 10}, data(10, 0xa3), 0, func() { copy(shadow[size-10:], data(10, 0xa3)) }},
				{request{typ: CmdWrite, offset: size - 10, length: 11}, data(11, 0xee), ENOSPC, nil},
				{request{typ: CmdWrite, offset: size + 512, length: 512}, data(512, 0xee), ENOSPC, nil},
				{request{typ: CmdWrite, flags: CmdFlagDF, length: 512}, data(512, 0xee), EINVAL, nil},
				{request{typ: CmdWrite, flags: CmdFlagNoHole, length: 512}, data(512, 0xee), EINVAL, nil},
				{request{typ: CmdWrite, length: 0}, nil, 0, nil},
				{request{typ: CmdWriteZeroes, offset: 200, length: 100}, nil, 0, func() { clear(shadow[200:300]) }},
				{request{typ: CmdWriteZeroes, flags: CmdFlagNoHole | CmdFlagFUA, offset: 66000, length: 1000}, nil, 0, func() { clear(shadow[66000:67000]) }},
				// Unaligned: zeroing would write bytes, so FAST_ZERO refuses
				// without changing anything.
				{request{typ: CmdWrite, offset: 300000, length: 1000}, data(1000, 0xa4), 0, func() { copy(shadow[300000:], data(1000, 0xa4)) }},
				{request{typ: CmdWriteZeroes, flags: CmdFlagFastZero, offset: 300100, length: 10}, nil, ENOTSUP, nil},
				{request{typ: CmdWriteZeroes, flags: CmdFlagFastZero, offset: 0, length: 128 << 10}, nil, 0, func() { clear(shadow[:128<<10]) }},
				{request{typ: CmdWriteZeroes, offset: size - 1, length: 2}, nil, ENOSPC, nil},
				{request{typ: CmdWriteZeroes, flags: CmdFlagDF, length: 2}, nil, EINVAL, nil},
				// Trim releases whole clusters only (then reading zeroes).
				{request{typ: CmdWrite, offset: 512 << 10, length: 256 << 10}, data(256<<10, 0xa5), 0, func() { copy(shadow[512<<10:], data(256<<10, 0xa5)) }},
				{request{typ: CmdTrim, flags: CmdFlagFUA, offset: 512<<10 + 1, length: 192 << 10}, nil, 0, func() { clear(shadow[576<<10 : 704<<10]) }},
				{request{typ: CmdTrim, offset: size - 1, length: 2}, nil, EINVAL, nil},
				{request{typ: CmdTrim, flags: CmdFlagNoHole, length: 2}, nil, EINVAL, nil},
				{request{typ: CmdFlush}, nil, 0, nil},
				{request{typ: CmdFlush, flags: CmdFlagFUA}, nil, EINVAL, nil},
			}
			for i, tc := range tests {
				tc.req.cookie = uint64(100 + i)
				rc.write(append(tc.req.append(nil, ext), tc.payload...))
				h, p := rc.reply()
				errno := replyErrno(t, tc.req.typ, h, p)
				if h.cookie != tc.req.cookie || errno != tc.errno {
					t.Errorf("#%d %v flags %#x at %d+%d: cookie %d errno %v, want %d %v", i, tc.req.typ, tc.req.flags, tc.req.offset, tc.req.length, h.cookie, errno, tc.req.cookie, tc.errno)
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
	c, err := Dial(context.Background(), uri, ClientOptions{ExportName: "rw", StructuredReplies: true})
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
	if err := c.WriteFlags([]byte("fua"), 7, CmdFlagFUA); err != nil {
		t.Fatal(err)
	}
	copy(shadow[7:], "fua")
	if err := c.WriteZeroes(1<<20, 1<<20, CmdFlagNoHole); err != nil {
		t.Fatal(err)
	}
	clear(shadow[1<<20 : 2<<20])
	if err := c.Trim(3<<20, 1<<20, 0); err != nil { // up to the end: whole clusters
		t.Fatal(err)
	}
	clear(shadow[3<<20:])
	var se *ServerError
	if err := c.WriteZeroes(5, 5, CmdFlagFastZero); !errors.As(err, &se) || se.Errno != ENOTSUP {
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

	ro, err := Dial(context.Background(), uri, ClientOptions{ExportName: "ro"})
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	for name, f := range map[string]func() error{
		"write":        func() error { _, err := ro.WriteAt([]byte("x"), 0); return err },
		"write-zeroes": func() error { return ro.WriteZeroes(0, 4096, 0) },
		"trim":         func() error { return ro.Trim(0, 65536, 0) },
	} {
		if err := f(); !errors.As(err, &se) || se.Errno != EPERM {
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
	dial := func(structured bool) *Client {
		c, err := Dial(context.Background(), uri, ClientOptions{StructuredReplies: structured})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	w := dial(false)
	readers := []*Client{dial(true), dial(false)}
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
		req  request
		data []byte
	}{
		"huge write":          {true, request{typ: CmdWrite, length: 1 << 40}, nil},
		"write above limit":   {false, request{typ: CmdWrite, length: 32<<20 + 1}, make([]byte, 1<<20)},
		"half a write":        {false, request{typ: CmdWrite, length: 1 << 20}, make([]byte, 4096)},
		"half a write (ext)":  {true, request{typ: CmdWrite, length: 1 << 20}, bytes.Repeat([]byte{7}, 65536)},
		"write then hang up":  {false, request{typ: CmdWrite, offset: 1 << 20, length: 8}, nil},
		"zeroes past the end": {true, request{typ: CmdWriteZeroes, offset: 1 << 62, length: 1 << 62}, nil},
	} {
		rc := dialRaw(t, uri)
		if tc.ext {
			rc.final(OptExtendedHeaders, nil)
		}
		rc.goExport()
		rc.c.Write(append(tc.req.append(nil, tc.ext), tc.data...)) // may fail: the server hangs up
		rc.c.Close()
	}
	c, err := Dial(context.Background(), uri, ClientOptions{StructuredReplies: true})
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
