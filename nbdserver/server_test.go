package nbdserver

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/nbdgw/nbdgw/metactx"
	"github.com/nbdgw/nbdgw/qcow2"
)

var modes = []struct {
	name string
	opts ClientOptions
	want ReplyMode
}{
	{"simple", ClientOptions{}, ModeSimple},
	{"structured", ClientOptions{StructuredReplies: true}, ModeStructured},
	{"extended", ClientOptions{ExtendedHeaders: true}, ModeExtended},
}

// TestClientServer reads the whole export and maps every context through
// our client and server in each reply mode, against the engine.
func TestClientServer(t *testing.T) {
	img, _ := chainImage(t)
	_, uri := startServer(t, Config{Exports: []*Export{{Name: "top", Image: img}}})
	want := make([]byte, img.Size())
	if _, err := img.ReadAt(want, 0); err != nil {
		t.Fatal(err)
	}
	names := metactx.Names(img)
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			opts := m.opts
			if m.want != ModeSimple {
				opts.MetaContexts = names
			}
			c, err := Dial(context.Background(), uri, opts)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if c.mode != m.want {
				t.Fatalf("mode %v, want %v", c.mode, m.want)
			}
			if c.Size() != img.Size() {
				t.Fatalf("size %d, want %d", c.Size(), img.Size())
			}
			if f := c.TransmissionFlags(); f&FlagReadOnly == 0 || f&FlagCanMultiConn == 0 {
				t.Errorf("flags %#x lack READ_ONLY or CAN_MULTI_CONN", f)
			}
			got := make([]byte, img.Size())
			if _, err := c.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatal("export content differs from the engine's")
			}
			if m.want == ModeSimple {
				return
			}
			for _, name := range names {
				var spans []span
				err := c.BlockStatus(context.Background(), name, 0, c.Size(), func(off, n int64, f uint32) error {
					spans = append(spans, span{off, n, f})
					return nil
				})
				if err != nil {
					t.Fatalf("%s: %v", name, err)
				}
				if got, want := coalesce(spans), engineMap(t, img, name); !slices.Equal(got, want) {
					t.Errorf("%s:\n got %v\nwant %v", name, got, want)
				}
			}
		})
	}
}

// TestReadSegments checks that reads of zero ranges become holes and
// that DF turns them off, by driving NBD_CMD_READ by hand.
func TestReadHoles(t *testing.T) {
	img, _ := chainImage(t)
	_, uri := startServer(t, Config{Exports: []*Export{{Image: img}}})
	rc := dialRaw(t, uri)
	rc.final(OptStructuredReply, nil)
	rc.goExport()
	for _, tc := range []struct {
		flags     uint16
		wantHoles bool
	}{{0, true}, {CmdFlagDF, false}} {
		rc.write(Request{Type: CmdRead, Flags: tc.flags, Cookie: 7, Offset: 0, Length: 4 << 20}.Append(nil, false))
		got := make([]byte, 4<<20)
		holes := 0
		for {
			h, p := rc.reply()
			switch h.Type {
			case ReplyTypeOffsetData:
				copy(got[be.Uint64(p):], p[8:])
			case ReplyTypeOffsetHole:
				holes++
			default:
				t.Fatalf("chunk type %d", h.Type)
			}
			if h.Flags&ReplyFlagDone != 0 {
				break
			}
		}
		want := make([]byte, 4<<20)
		img.ReadAt(want, 0)
		if !bytes.Equal(got, want) {
			t.Errorf("flags %#x: content differs", tc.flags)
		}
		if (holes > 0) != tc.wantHoles {
			t.Errorf("flags %#x: %d hole chunks", tc.flags, holes)
		}
	}
}

// TestExtendedWholeExport maps a large sparse export with many extents in
// one BLOCK_STATUS round trip with extended headers; 32-bit mode needs
// several, each under 4 GiB.
func TestExtendedWholeExport(t *testing.T) {
	needTool(t, "qemu-img", "qemu-io")
	p := filepath.Join(t.TempDir(), "big.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "64G")
	var cmds []string
	for i := range 64 {
		cmds = append(cmds, "-c", fmt.Sprintf("write -P 1 %d 64k", int64(i)<<30))
	}
	run(t, "qemu-io", append(cmds, p)...)
	img, err := qcow2.Open(p, qcow2.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() }) // after the server stops
	_, uri := startServer(t, Config{Exports: []*Export{{Image: img}}})
	for _, tc := range []struct {
		opts       ClientOptions
		roundTrips int
	}{
		{ClientOptions{ExtendedHeaders: true}, 1},
		{ClientOptions{StructuredReplies: true}, 32}, // 2 GiB requests
	} {
		tc.opts.MetaContexts = []string{metactx.BaseAllocation}
		c, err := Dial(context.Background(), uri, tc.opts)
		if err != nil {
			t.Fatal(err)
		}
		trips, extents := 0, 0
		for off := int64(0); off < c.Size(); trips++ {
			c.mu.Lock()
			n, err := c.blockStatus(0, off, c.Size()-off, func(_, _ int64, _ uint32) error { extents++; return nil })
			c.mu.Unlock()
			if err != nil {
				t.Fatal(err)
			}
			off += n
		}
		c.Close()
		if trips != tc.roundTrips || extents != 128 {
			t.Errorf("mode %v: %d round trips, %d extents; want %d, 128", c.mode, trips, extents, tc.roundTrips)
		}
	}
}

// TestBlockStatusPayload selects contexts per request with
// NBD_CMD_FLAG_PAYLOAD_LEN, and checks REQ_ONE and the errors.
func TestBlockStatusPayload(t *testing.T) {
	img, _ := chainImage(t)
	_, uri := startServer(t, Config{Exports: []*Export{{Image: img}}})
	rc := dialRaw(t, uri)
	if got := rc.final(OptExtendedHeaders, nil); got != RepAck {
		t.Fatalf("EXTENDED_HEADERS: %v", got)
	}
	set := MetaContextRequest{Queries: []string{metactx.BaseAllocation, metactx.AllocationDepth, metactx.JointAllocation}}.Append(nil)
	if got := rc.final(OptSetMetaContext, set); got != RepAck {
		t.Fatalf("SET_META_CONTEXT: %v", got)
	}
	r, p := rc.option(OptGo, InfoRequest{}.Append(nil))
	var flags uint16
	for i, h := range r {
		if h.Type == RepInfo && be.Uint16(p[i]) == InfoExport {
			flags = be.Uint16(p[i][10:])
		}
	}
	if flags&FlagBlockStatusPayload == 0 {
		t.Fatalf("flags %#x lack NBD_FLAG_BLOCK_STATUS_PAYLOAD", flags)
	}
	size := uint64(img.Size())
	tests := []struct {
		name    string
		flags   uint16
		payload []byte
		wantIDs []uint32 // chunks expected, in order
		wantOne bool
		errno   Errno
	}{
		{"all", 0, nil, []uint32{0, 1, 2}, false, 0},
		{"one id", CmdFlagPayloadLen, BlockStatusPayload{size, []uint32{1}}.Append(nil), []uint32{1}, false, 0},
		{"two ids", CmdFlagPayloadLen, BlockStatusPayload{size, []uint32{2, 0}}.Append(nil), []uint32{2, 0}, false, 0},
		{"dup id", CmdFlagPayloadLen, BlockStatusPayload{size, []uint32{2, 2}}.Append(nil), nil, false, EINVAL},
		{"too many ids", CmdFlagPayloadLen, BlockStatusPayload{size, []uint32{0, 1, 2, 0}}.Append(nil), nil, false, EINVAL},
		{"short payload", CmdFlagPayloadLen, []byte{0, 0, 0, 1}, nil, false, EINVAL},
		{"req one", CmdFlagPayloadLen | CmdFlagReqOne, BlockStatusPayload{size, []uint32{0}}.Append(nil), []uint32{0}, true, 0},
		{"unknown id", CmdFlagPayloadLen, BlockStatusPayload{size, []uint32{0, 9}}.Append(nil), nil, false, EINVAL},
		{"no ids", CmdFlagPayloadLen, BlockStatusPayload{size, nil}.Append(nil), nil, false, EINVAL},
		{"odd payload", CmdFlagPayloadLen, []byte{0, 0, 0, 0, 0, 0, 1, 0, 0}, nil, false, EINVAL},
		{"beyond end", CmdFlagPayloadLen, BlockStatusPayload{size + 1, []uint32{0}}.Append(nil), nil, false, EINVAL},
	}
	for i, tc := range tests {
		req := Request{Type: CmdBlockStatus, Flags: tc.flags, Cookie: uint64(i), Length: size}
		if tc.payload != nil {
			req.Length = uint64(len(tc.payload))
		}
		rc.write(append(req.Append(nil, true), tc.payload...))
		var ids []uint32
		for {
			h, p := rc.reply()
			if h.Cookie != uint64(i) {
				t.Fatalf("%s: cookie %d", tc.name, h.Cookie)
			}
			switch h.Type {
			case ReplyTypeError:
				errno, _, _ := DecodeErrorPayload(p)
				if errno != tc.errno {
					t.Errorf("%s: error %v, want %v", tc.name, errno, tc.errno)
				}
			case ReplyTypeBlockStatusExt:
				id, es, err := DecodeBlockStatus(p, true)
				if err != nil {
					t.Fatalf("%s: %v", tc.name, err)
				}
				ids = append(ids, id)
				if tc.wantOne && len(es) != 1 {
					t.Errorf("%s: %d extents with REQ_ONE", tc.name, len(es))
				}
			default:
				t.Fatalf("%s: chunk type %d", tc.name, h.Type)
			}
			if h.Flags&ReplyFlagDone != 0 {
				break
			}
		}
		if tc.errno == 0 && !slices.Equal(ids, tc.wantIDs) {
			t.Errorf("%s: chunks for %v, want %v", tc.name, ids, tc.wantIDs)
		}
	}
}

// TestCommandErrors checks per-request errors that leave the connection
// usable, in each mode.
func TestCommandErrors(t *testing.T) {
	img := rawImage(t, 1<<20)
	_, uri := startServer(t, Config{Exports: []*Export{{Image: img}}})
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			rc := dialRaw(t, uri)
			switch m.want {
			case ModeStructured:
				rc.final(OptStructuredReply, nil)
			case ModeExtended:
				rc.final(OptExtendedHeaders, nil)
			}
			rc.goExport()
			ext := m.want == ModeExtended
			tests := []struct {
				req     Request
				payload []byte
				errno   Errno
			}{
				{Request{Type: CmdWrite, Length: 512}, make([]byte, 512), EPERM},
				{Request{Type: CmdTrim, Length: 512}, nil, EPERM},
				{Request{Type: CmdWriteZeroes, Length: 512}, nil, EPERM},
				{Request{Type: CmdRead, Offset: 1 << 20, Length: 1}, nil, EINVAL},
				{Request{Type: CmdRead, Length: 64 << 20}, nil, EINVAL},
				{Request{Type: CmdRead, Flags: CmdFlagFUA, Length: 1}, nil, EINVAL},
				{Request{Type: CmdCache, Offset: 1<<20 - 1, Length: 2}, nil, EINVAL},
				{Request{Type: CmdBlockStatus, Length: 512}, nil, EINVAL}, // no contexts
				{Request{Type: 42}, nil, EINVAL},
				{Request{Type: CmdFlush}, nil, 0},
				{Request{Type: CmdCache, Length: 4096}, nil, 0},
			}
			for i, tc := range tests {
				tc.req.Cookie = uint64(100 + i)
				rc.write(append(tc.req.Append(nil, ext), tc.payload...))
				h, p := rc.reply()
				errno := replyErrno(t, tc.req.Type, h, p)
				if h.Cookie != tc.req.Cookie || errno != tc.errno {
					t.Errorf("%v: cookie %d errno %v, want %d %v", tc.req.Type, h.Cookie, errno, tc.req.Cookie, tc.errno)
				}
			}
		})
	}
}

// TestNegotiation checks the option replies, including misuse.
func TestNegotiation(t *testing.T) {
	img, _ := chainImage(t)
	_, uri := startServer(t, Config{Exports: []*Export{{Name: "a", Description: "first", Image: img}, {Name: "b", Image: img}}})
	list := func(q ...string) []byte { return MetaContextRequest{Export: "a", Queries: q}.Append(nil) }
	type step struct {
		opt  Option
		data []byte
		want Reply
		ctxs []string // META_CONTEXT names expected before the ACK
	}
	tests := []struct {
		name  string
		steps []step
	}{
		{"unknown option", []step{{Option(99), []byte("xyz"), RepErrUnsup, nil}}},
		{"peek export", []step{{OptPeekExport, nil, RepErrUnsup, nil}}},
		{"structured twice", []step{{OptStructuredReply, nil, RepAck, nil}, {OptStructuredReply, nil, RepErrInvalid, nil}}},
		{"structured after extended", []step{{OptExtendedHeaders, nil, RepAck, nil}, {OptStructuredReply, nil, RepErrExtHeaderReqd, nil}}},
		{"extended twice", []step{{OptExtendedHeaders, nil, RepAck, nil}, {OptExtendedHeaders, nil, RepErrInvalid, nil}}},
		{"extended after structured", []step{{OptStructuredReply, nil, RepAck, nil}, {OptExtendedHeaders, nil, RepAck, nil}}},
		{"structured with data", []step{{OptStructuredReply, []byte{1}, RepErrInvalid, nil}}},
		{"meta context before structured", []step{{OptSetMetaContext, list(metactx.BaseAllocation), RepErrInvalid, nil}}},
		{"list all", []step{{OptStructuredReply, nil, RepAck, nil}, {OptListMetaContext, list(), RepAck, metactx.Names(img)}}},
		{"list qemu:", []step{{OptStructuredReply, nil, RepAck, nil}, {OptListMetaContext, list("qemu:"), RepAck, metactx.Names(img)[1:]}}},
		{"list bitmaps", []step{{OptStructuredReply, nil, RepAck, nil}, {OptListMetaContext, list("qemu:dirty-bitmap:"), RepAck, []string{"qemu:dirty-bitmap:b0"}}}},
		{"list base:", []step{{OptStructuredReply, nil, RepAck, nil}, {OptListMetaContext, list("base:"), RepAck, []string{metactx.BaseAllocation}}}},
		{"list unknown", []step{{OptStructuredReply, nil, RepAck, nil}, {OptListMetaContext, list("x:y"), RepAck, nil}}},
		{"set exact", []step{{OptExtendedHeaders, nil, RepAck, nil}, {OptSetMetaContext, list(metactx.JointAllocation, "qemu:", metactx.JointAllocation, "qemu:dirty-bitmap:b0"), RepAck, []string{metactx.JointAllocation, "qemu:dirty-bitmap:b0"}}}},
		{"set unknown export", []step{{OptStructuredReply, nil, RepAck, nil}, {OptSetMetaContext, MetaContextRequest{Export: "zz"}.Append(nil), RepErrUnknown, nil}}},
		{"meta context garbage", []step{{OptStructuredReply, nil, RepAck, nil}, {OptSetMetaContext, []byte{0, 0, 0, 9, 1}, RepErrInvalid, nil}}},
		{"info unknown export", []step{{OptInfo, InfoRequest{Export: "zz"}.Append(nil), RepErrUnknown, nil}}},
		{"info garbage", []step{{OptInfo, []byte{0, 0, 0, 1, 'a', 0, 3}, RepErrInvalid, nil}}},
		{"info ok", []step{{OptInfo, InfoRequest{Export: "b", Infos: []uint16{InfoName, InfoDescription}}.Append(nil), RepAck, nil}}},
		{"list with data", []step{{OptList, []byte{1}, RepErrInvalid, nil}}},
		{"starttls without creds", []step{{OptStartTLS, nil, RepErrPolicy, nil}}},
		{"too big", []step{{OptInfo, make([]byte, 100<<10), RepErrTooBig, nil}, {OptInfo, InfoRequest{}.Append(nil), RepAck, nil}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rc := dialRaw(t, uri)
			for _, s := range tc.steps {
				r, p := rc.option(s.opt, s.data)
				if got := r[len(r)-1].Type; got != s.want {
					t.Fatalf("%v: %v, want %v", s.opt, got, s.want)
				}
				var ctxs []string
				for i, h := range r {
					if h.Type == RepMetaContext {
						ctxs = append(ctxs, string(p[i][4:]))
					}
				}
				if s.want == RepAck && !slices.Equal(ctxs, s.ctxs) {
					t.Errorf("%v: contexts %q, want %q", s.opt, ctxs, s.ctxs)
				}
			}
			// The connection still works after every step.
			rc.goExport()
		})
	}
}

// TestListAndInfo checks NBD_OPT_LIST and the INFO replies.
func TestListAndInfo(t *testing.T) {
	img := rawImage(t, 1<<20)
	_, uri := startServer(t, Config{Exports: []*Export{{Name: "a", Description: "first", Image: img}, {Name: "b", Image: img}}})
	rc := dialRaw(t, uri)
	r, p := rc.option(OptList, nil)
	var names []string
	for i, h := range r {
		if h.Type == RepServer {
			n, _, err := CutString(p[i], 4096)
			if err != nil {
				t.Fatal(err)
			}
			names = append(names, n)
		}
	}
	if !slices.Equal(names, []string{"a", "b"}) {
		t.Errorf("LIST: %q", names)
	}
	r, p = rc.option(OptInfo, InfoRequest{Export: "", Infos: []uint16{InfoName, InfoDescription}}.Append(nil))
	got := map[uint16]string{}
	for i, h := range r {
		if h.Type == RepInfo {
			got[be.Uint16(p[i])] = string(p[i][2:])
		}
	}
	if got[InfoName] != "a" || got[InfoDescription] != "first" || len(got[InfoExport]) != 10 || len(got[InfoBlockSize]) != 12 {
		t.Errorf("INFO replies %v", got)
	}
}

// TestExportName enters transmission with the old NBD_OPT_EXPORT_NAME.
func TestExportName(t *testing.T) {
	img := rawImage(t, 1<<20)
	_, uri := startServer(t, Config{Exports: []*Export{{Name: "a", Image: img}}})
	rc := dialRaw(t, uri)
	rc.write(append(OptHeader{Opt: OptExportName, Length: 1}.Append(nil), 'a'))
	var b [10]byte
	rc.read(b[:])
	if be.Uint64(b[:]) != 1<<20 || be.Uint16(b[8:])&FlagHasFlags == 0 {
		t.Fatalf("EXPORT_NAME reply %x", b)
	}
	rc.write(Request{Type: CmdRead, Cookie: 1, Length: 16}.Append(nil, false))
	h, _ := rc.reply()
	if h.Magic != SimpleReplyMagic || h.Errno != 0 {
		t.Fatalf("read reply %+v", h)
	}
	// An unknown name closes the connection without a reply.
	rc = dialRaw(t, uri)
	rc.write(append(OptHeader{Opt: OptExportName, Length: 1}.Append(nil), 'z'))
	if _, err := rc.r.ReadByte(); !errors.Is(err, io.EOF) {
		t.Fatalf("after unknown EXPORT_NAME: %v", err)
	}
}

// TestPipelined sends many reads before reading any reply; every reply
// comes back once with the right data.
func TestPipelined(t *testing.T) {
	img, _ := chainImage(t)
	_, uri := startServer(t, Config{Exports: []*Export{{Image: img}}, MaxInFlight: 4})
	rc := dialRaw(t, uri)
	rc.final(OptStructuredReply, nil)
	rc.goExport()
	const n = 64
	go func() {
		var b []byte
		for i := range n {
			b = Request{Type: CmdRead, Cookie: uint64(i), Offset: uint64(i) * 64 << 10, Length: 64 << 10, Flags: CmdFlagDF}.Append(b, false)
		}
		rc.c.Write(b)
	}()
	seen := map[uint64]bool{}
	for range n {
		h, p := rc.reply()
		if seen[h.Cookie] || h.Type != ReplyTypeOffsetData {
			t.Fatalf("reply %+v (seen %v)", h, seen[h.Cookie])
		}
		seen[h.Cookie] = true
		want := make([]byte, 64<<10)
		img.ReadAt(want, int64(h.Cookie)*64<<10)
		if !bytes.Equal(p[8:], want) {
			t.Fatalf("cookie %d: wrong data", h.Cookie)
		}
	}
}

// TestServerClose ends Serve and open connections.
func TestServerClose(t *testing.T) {
	img := rawImage(t, 1<<20)
	srv, uri := startServer(t, Config{Exports: []*Export{{Image: img}}})
	c, err := Dial(context.Background(), uri, ClientOptions{StructuredReplies: true})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { srv.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Close hangs")
	}
	if _, err := c.ReadAt(make([]byte, 1), 0); err == nil {
		t.Fatal("read after Close succeeded")
	}
}

// TestReadPaths reads the chain over a unix socket (data sent with
// sendfile from the host files) and over a pipe (everything read through
// the engine), with and without holes, at odd offsets and lengths.
func TestReadPaths(t *testing.T) {
	img, _ := chainImage(t)
	srv, uri := startServer(t, Config{Exports: []*Export{{Image: img}}})
	want := make([]byte, img.Size())
	img.ReadAt(want, 0)
	pipe := func(opts ClientOptions) (*Client, error) {
		a, b := net.Pipe()
		go srv.ServeConn(context.Background(), b)
		return NewClient(context.Background(), a, opts)
	}
	unix := func(opts ClientOptions) (*Client, error) { return Dial(context.Background(), uri, opts) }
	for name, dial := range map[string]func(ClientOptions) (*Client, error){"unix": unix, "pipe": pipe} {
		for _, m := range modes {
			c, err := dial(m.opts)
			if err != nil {
				t.Fatal(err)
			}
			for _, r := range [][2]int64{{0, img.Size()}, {1, 200 << 10}, {65535, 3<<20 + 7}, {4<<20 - 3, 70 << 10}, {img.Size() - 5, 5}} {
				got := make([]byte, r[1])
				if _, err := c.ReadAt(got, r[0]); err != nil {
					t.Fatalf("%s/%s: read %v: %v", name, m.name, r, err)
				}
				if !bytes.Equal(got, want[r[0]:r[0]+r[1]]) {
					t.Errorf("%s/%s: read %v differs", name, m.name, r)
				}
			}
			c.Close()
		}
	}
}

// TestCloseDrains closes the server while a reply is being written: the
// reply that started must arrive whole, every other reply too, and the
// connection must then end at a reply boundary. The close is made to land
// mid-reply every run: replies of 1 MiB do not fit in a unix socket's
// buffer, so once the client has read the first reply's header and stops
// reading, the server is blocked inside that reply; the client reads on
// only after Close has stopped the connection.
func TestCloseDrains(t *testing.T) {
	img := rawImage(t, 32<<20)
	srv, uri := startServer(t, Config{Exports: []*Export{{Image: img}}})
	rc := dialRaw(t, uri)
	rc.final(OptStructuredReply, nil)
	rc.goExport()
	var b []byte
	for i := range 32 {
		b = Request{Type: CmdRead, Flags: CmdFlagDF, Cookie: uint64(i), Offset: uint64(i) << 20, Length: 1 << 20}.Append(b, false)
	}
	rc.write(b)
	closed := make(chan error, 1)
	got := 0
	seen := map[uint64]bool{}
	for {
		var hb [StructuredReplyLen]byte
		n, err := io.ReadFull(rc.r, hb[:])
		// Unread requests make the close a reset rather than an EOF.
		if n == 0 && got > 0 && (errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)) {
			break
		}
		if err != nil {
			t.Fatalf("after %d replies: partial or missing header: %v", got, err)
		}
		h, err := DecodeReplyHeader(hb[:])
		if err != nil {
			t.Fatal(err)
		}
		if h.Cookie >= 32 || seen[h.Cookie] {
			t.Fatalf("reply %d: cookie %d (seen before: %v)", got, h.Cookie, seen[h.Cookie])
		}
		seen[h.Cookie] = true
		if got == 0 {
			// The server is inside this reply's payload: close now.
			go func() { closed <- srv.Close() }()
			deadline := time.Now().Add(10 * time.Second)
			for !srv.isClosed() {
				if time.Now().After(deadline) {
					t.Fatal("Close did not begin within 10 s")
				}
				time.Sleep(time.Millisecond)
			}
		}
		if _, err := io.ReadFull(rc.r, make([]byte, h.Length)); err != nil {
			t.Fatalf("after %d replies: partial payload of the reply to %d: %v", got, h.Cookie, err)
		}
		got++
	}
	select {
	case err := <-closed:
		if err != nil {
			t.Errorf("Close: %v", err)
		}
	case <-time.After(2 * drainTimeout):
		t.Fatal("Close did not return after the drain")
	}
	t.Logf("%d of 32 replies, the first of them cut by the close, arrived whole", got)
}

// TestPanicDropsOneClient: a panic while serving one client (here an
// export whose image is unusable) drops that client only.
func TestPanicDropsOneClient(t *testing.T) {
	good := rawImage(t, 1<<20)
	_, uri := startServer(t, Config{Exports: []*Export{{Name: "good", Image: good}, {Name: "bad", Image: &qcow2.Image{}}}, Logf: func(string, ...any) {}})
	if _, err := Dial(context.Background(), uri, ClientOptions{ExportName: "bad"}); err == nil {
		t.Fatal("handshake with a broken export succeeded")
	}
	c, err := Dial(context.Background(), uri, ClientOptions{ExportName: "good", StructuredReplies: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.ReadAt(make([]byte, 512), 0); err != nil {
		t.Fatal(err)
	}
	c.Close()
}
