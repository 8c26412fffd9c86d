package nbdserver

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/nbdgw/nbdgw/internal/metactx"
	"github.com/nbdgw/nbdgw/nbdserver/nbdclient"
	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
	"github.com/nbdgw/nbdgw/qcow2"
)

var modes = []struct {
	name string
	opts nbdclient.Options
	want nbdproto.ReplyMode
}{
	{"simple", nbdclient.Options{}, nbdproto.ModeSimple},
	{"structured", nbdclient.Options{StructuredReplies: true}, nbdproto.ModeStructured},
	{"extended", nbdclient.Options{ExtendedHeaders: true}, nbdproto.ModeExtended},
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
			if m.want != nbdproto.ModeSimple {
				opts.MetaContexts = names
			}
			c, err := nbdclient.Dial(context.Background(), uri, opts)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if c.Mode() != m.want {
				t.Fatalf("mode %v, want %v", c.Mode(), m.want)
			}
			if c.Size() != img.Size() {
				t.Fatalf("size %d, want %d", c.Size(), img.Size())
			}
			if f := c.TransmissionFlags(); f&nbdproto.FlagReadOnly == 0 || f&nbdproto.FlagCanMultiConn == 0 {
				t.Errorf("flags %#x lack READ_ONLY or CAN_MULTI_CONN", f)
			}
			got := make([]byte, img.Size())
			if _, err := c.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatal("export content differs from the engine's")
			}
			if m.want == nbdproto.ModeSimple {
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
	rc.final(nbdproto.OptStructuredReply, nil)
	rc.goExport()
	for _, tc := range []struct {
		flags     nbdproto.CmdFlags
		wantHoles bool
	}{{0, true}, {nbdproto.CmdFlagDF, false}} {
		rc.write(nbdproto.Request{Type: nbdproto.CmdRead, Flags: tc.flags, Cookie: 7, Offset: 0, Length: 4 << 20}.Append(nil, false))
		got := make([]byte, 4<<20)
		holes := 0
		for {
			h, p := rc.reply()
			switch h.Type {
			case nbdproto.ReplyTypeOffsetData:
				copy(got[be.Uint64(p):], p[8:])
			case nbdproto.ReplyTypeOffsetHole:
				holes++
			default:
				t.Fatalf("chunk type %d", h.Type)
			}
			if h.Flags&nbdproto.ReplyFlagDone != 0 {
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

// TestBlockStatusPayload selects contexts per request with
// NBD_CMD_FLAG_PAYLOAD_LEN, and checks REQ_ONE and the errors.
func TestBlockStatusPayload(t *testing.T) {
	img, _ := chainImage(t)
	_, uri := startServer(t, Config{Exports: []*Export{{Image: img}}})
	rc := dialRaw(t, uri)
	if got := rc.final(nbdproto.OptExtendedHeaders, nil); got != nbdproto.RepAck {
		t.Fatalf("EXTENDED_HEADERS: %v", got)
	}
	set := nbdproto.MetaContextRequest{Queries: []string{metactx.BaseAllocation, metactx.AllocationDepth, metactx.JointAllocation}}.Append(nil)
	if got := rc.final(nbdproto.OptSetMetaContext, set); got != nbdproto.RepAck {
		t.Fatalf("SET_META_CONTEXT: %v", got)
	}
	r, p := rc.option(nbdproto.OptGo, nbdproto.InfoRequest{}.Append(nil))
	var flags nbdproto.Flags
	for i, h := range r {
		if h.Type == nbdproto.RepInfo && nbdproto.Info(be.Uint16(p[i])) == nbdproto.InfoExport {
			flags = nbdproto.Flags(be.Uint16(p[i][10:]))
		}
	}
	if flags&nbdproto.FlagBlockStatusPayload == 0 {
		t.Fatalf("flags %#x lack NBD_FLAG_BLOCK_STATUS_PAYLOAD", flags)
	}
	size := uint64(img.Size())
	tests := []struct {
		name    string
		flags   nbdproto.CmdFlags
		payload []byte
		wantIDs []uint32 // chunks expected, in order
		wantOne bool
		errno   nbdproto.Errno
	}{
		{"all", 0, nil, []uint32{0, 1, 2}, false, 0},
		{"one id", nbdproto.CmdFlagPayloadLen, nbdproto.BlockStatusPayload{Length: size, IDs: []uint32{1}}.Append(nil), []uint32{1}, false, 0},
		{"two ids", nbdproto.CmdFlagPayloadLen, nbdproto.BlockStatusPayload{Length: size, IDs: []uint32{2, 0}}.Append(nil), []uint32{2, 0}, false, 0},
		{"dup id", nbdproto.CmdFlagPayloadLen, nbdproto.BlockStatusPayload{Length: size, IDs: []uint32{2, 2}}.Append(nil), nil, false, nbdproto.EINVAL},
		{"too many ids", nbdproto.CmdFlagPayloadLen, nbdproto.BlockStatusPayload{Length: size, IDs: []uint32{0, 1, 2, 0}}.Append(nil), nil, false, nbdproto.EINVAL},
		{"short payload", nbdproto.CmdFlagPayloadLen, []byte{0, 0, 0, 1}, nil, false, nbdproto.EINVAL},
		{"req one", nbdproto.CmdFlagPayloadLen | nbdproto.CmdFlagReqOne, nbdproto.BlockStatusPayload{Length: size, IDs: []uint32{0}}.Append(nil), []uint32{0}, true, 0},
		{"unknown id", nbdproto.CmdFlagPayloadLen, nbdproto.BlockStatusPayload{Length: size, IDs: []uint32{0, 9}}.Append(nil), nil, false, nbdproto.EINVAL},
		{"no ids", nbdproto.CmdFlagPayloadLen, nbdproto.BlockStatusPayload{Length: size, IDs: nil}.Append(nil), nil, false, nbdproto.EINVAL},
		{"odd payload", nbdproto.CmdFlagPayloadLen, []byte{0, 0, 0, 0, 0, 0, 1, 0, 0}, nil, false, nbdproto.EINVAL},
		{"beyond end", nbdproto.CmdFlagPayloadLen, nbdproto.BlockStatusPayload{Length: size + 1, IDs: []uint32{0}}.Append(nil), nil, false, nbdproto.EINVAL},
	}
	for i, tc := range tests {
		req := nbdproto.Request{Type: nbdproto.CmdBlockStatus, Flags: tc.flags, Cookie: uint64(i), Length: size}
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
			case nbdproto.ReplyTypeError:
				errno, _, _ := nbdproto.DecodeErrorPayload(p)
				if errno != tc.errno {
					t.Errorf("%s: error %v, want %v", tc.name, errno, tc.errno)
				}
			case nbdproto.ReplyTypeBlockStatusExt:
				id, es, err := nbdproto.DecodeBlockStatus(p, true)
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
			if h.Flags&nbdproto.ReplyFlagDone != 0 {
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
			case nbdproto.ModeStructured:
				rc.final(nbdproto.OptStructuredReply, nil)
			case nbdproto.ModeExtended:
				rc.final(nbdproto.OptExtendedHeaders, nil)
			}
			rc.goExport()
			ext := m.want == nbdproto.ModeExtended
			tests := []struct {
				req     nbdproto.Request
				payload []byte
				errno   nbdproto.Errno
			}{
				{nbdproto.Request{Type: nbdproto.CmdWrite, Length: 512}, make([]byte, 512), nbdproto.EPERM},
				{nbdproto.Request{Type: nbdproto.CmdTrim, Length: 512}, nil, nbdproto.EPERM},
				{nbdproto.Request{Type: nbdproto.CmdWriteZeroes, Length: 512}, nil, nbdproto.EPERM},
				{nbdproto.Request{Type: nbdproto.CmdRead, Offset: 1 << 20, Length: 1}, nil, nbdproto.EINVAL},
				{nbdproto.Request{Type: nbdproto.CmdRead, Length: 64 << 20}, nil, nbdproto.EINVAL},
				{nbdproto.Request{Type: nbdproto.CmdRead, Flags: nbdproto.CmdFlagFUA, Length: 1}, nil, nbdproto.EINVAL},
				{nbdproto.Request{Type: nbdproto.CmdCache, Offset: 1<<20 - 1, Length: 2}, nil, nbdproto.EINVAL},
				{nbdproto.Request{Type: nbdproto.CmdBlockStatus, Length: 512}, nil, nbdproto.EINVAL}, // no contexts
				{nbdproto.Request{Type: 42}, nil, nbdproto.EINVAL},
				{nbdproto.Request{Type: nbdproto.CmdFlush}, nil, 0},
				{nbdproto.Request{Type: nbdproto.CmdCache, Length: 4096}, nil, 0},
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
	list := func(q ...string) []byte { return nbdproto.MetaContextRequest{Export: "a", Queries: q}.Append(nil) }
	type step struct {
		opt  nbdproto.Option
		data []byte
		want nbdproto.Reply
		ctxs []string // META_CONTEXT names expected before the ACK
	}
	tests := []struct {
		name  string
		steps []step
	}{
		{"unknown option", []step{{nbdproto.Option(99), []byte("xyz"), nbdproto.RepErrUnsup, nil}}},
		{"peek export", []step{{nbdproto.OptPeekExport, nil, nbdproto.RepErrUnsup, nil}}},
		{"structured twice", []step{{nbdproto.OptStructuredReply, nil, nbdproto.RepAck, nil}, {nbdproto.OptStructuredReply, nil, nbdproto.RepErrInvalid, nil}}},
		{"structured after extended", []step{{nbdproto.OptExtendedHeaders, nil, nbdproto.RepAck, nil}, {nbdproto.OptStructuredReply, nil, nbdproto.RepErrExtHeaderReqd, nil}}},
		{"extended twice", []step{{nbdproto.OptExtendedHeaders, nil, nbdproto.RepAck, nil}, {nbdproto.OptExtendedHeaders, nil, nbdproto.RepErrInvalid, nil}}},
		{"extended after structured", []step{{nbdproto.OptStructuredReply, nil, nbdproto.RepAck, nil}, {nbdproto.OptExtendedHeaders, nil, nbdproto.RepAck, nil}}},
		{"structured with data", []step{{nbdproto.OptStructuredReply, []byte{1}, nbdproto.RepErrInvalid, nil}}},
		{"meta context before structured", []step{{nbdproto.OptSetMetaContext, list(metactx.BaseAllocation), nbdproto.RepErrInvalid, nil}}},
		{"list all", []step{{nbdproto.OptStructuredReply, nil, nbdproto.RepAck, nil}, {nbdproto.OptListMetaContext, list(), nbdproto.RepAck, metactx.Names(img)}}},
		{"list qemu:", []step{{nbdproto.OptStructuredReply, nil, nbdproto.RepAck, nil}, {nbdproto.OptListMetaContext, list("qemu:"), nbdproto.RepAck, metactx.Names(img)[1:]}}},
		{"list bitmaps", []step{{nbdproto.OptStructuredReply, nil, nbdproto.RepAck, nil}, {nbdproto.OptListMetaContext, list("qemu:dirty-bitmap:"), nbdproto.RepAck, []string{"qemu:dirty-bitmap:b0"}}}},
		{"list base:", []step{{nbdproto.OptStructuredReply, nil, nbdproto.RepAck, nil}, {nbdproto.OptListMetaContext, list("base:"), nbdproto.RepAck, []string{metactx.BaseAllocation}}}},
		{"list unknown", []step{{nbdproto.OptStructuredReply, nil, nbdproto.RepAck, nil}, {nbdproto.OptListMetaContext, list("x:y"), nbdproto.RepAck, nil}}},
		{"set exact", []step{{nbdproto.OptExtendedHeaders, nil, nbdproto.RepAck, nil}, {nbdproto.OptSetMetaContext, list(metactx.JointAllocation, "qemu:", metactx.JointAllocation, "qemu:dirty-bitmap:b0"), nbdproto.RepAck, []string{metactx.JointAllocation, "qemu:dirty-bitmap:b0"}}}},
		{"set unknown export", []step{{nbdproto.OptStructuredReply, nil, nbdproto.RepAck, nil}, {nbdproto.OptSetMetaContext, nbdproto.MetaContextRequest{Export: "zz"}.Append(nil), nbdproto.RepErrUnknown, nil}}},
		{"meta context garbage", []step{{nbdproto.OptStructuredReply, nil, nbdproto.RepAck, nil}, {nbdproto.OptSetMetaContext, []byte{0, 0, 0, 9, 1}, nbdproto.RepErrInvalid, nil}}},
		{"info unknown export", []step{{nbdproto.OptInfo, nbdproto.InfoRequest{Export: "zz"}.Append(nil), nbdproto.RepErrUnknown, nil}}},
		{"info garbage", []step{{nbdproto.OptInfo, []byte{0, 0, 0, 1, 'a', 0, 3}, nbdproto.RepErrInvalid, nil}}},
		{"info ok", []step{{nbdproto.OptInfo, nbdproto.InfoRequest{Export: "b", Infos: []nbdproto.Info{nbdproto.InfoName, nbdproto.InfoDescription}}.Append(nil), nbdproto.RepAck, nil}}},
		{"list with data", []step{{nbdproto.OptList, []byte{1}, nbdproto.RepErrInvalid, nil}}},
		{"starttls without creds", []step{{nbdproto.OptStartTLS, nil, nbdproto.RepErrPolicy, nil}}},
		{"too big", []step{{nbdproto.OptInfo, make([]byte, 100<<10), nbdproto.RepErrTooBig, nil}, {nbdproto.OptInfo, nbdproto.InfoRequest{}.Append(nil), nbdproto.RepAck, nil}}},
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
					if h.Type == nbdproto.RepMetaContext {
						ctxs = append(ctxs, string(p[i][4:]))
					}
				}
				if s.want == nbdproto.RepAck && !slices.Equal(ctxs, s.ctxs) {
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
	r, p := rc.option(nbdproto.OptList, nil)
	var names []string
	for i, h := range r {
		if h.Type == nbdproto.RepServer {
			n, _, err := nbdproto.CutString(p[i], 4096)
			if err != nil {
				t.Fatal(err)
			}
			names = append(names, n)
		}
	}
	if !slices.Equal(names, []string{"a", "b"}) {
		t.Errorf("LIST: %q", names)
	}
	r, p = rc.option(nbdproto.OptInfo, nbdproto.InfoRequest{Export: "", Infos: []nbdproto.Info{nbdproto.InfoName, nbdproto.InfoDescription}}.Append(nil))
	got := map[nbdproto.Info]string{}
	for i, h := range r {
		if h.Type == nbdproto.RepInfo {
			got[nbdproto.Info(be.Uint16(p[i]))] = string(p[i][2:])
		}
	}
	if got[nbdproto.InfoName] != "a" || got[nbdproto.InfoDescription] != "first" || len(got[nbdproto.InfoExport]) != 10 || len(got[nbdproto.InfoBlockSize]) != 12 {
		t.Errorf("INFO replies %v", got)
	}
}

// TestExportName enters transmission with the old NBD_OPT_EXPORT_NAME.
func TestExportName(t *testing.T) {
	img := rawImage(t, 1<<20)
	_, uri := startServer(t, Config{Exports: []*Export{{Name: "a", Image: img}}})
	rc := dialRaw(t, uri)
	rc.write(append(nbdproto.OptHeader{Opt: nbdproto.OptExportName, Length: 1}.Append(nil), 'a'))
	var b [10]byte
	rc.read(b[:])
	if be.Uint64(b[:]) != 1<<20 || nbdproto.Flags(be.Uint16(b[8:]))&nbdproto.FlagHasFlags == 0 {
		t.Fatalf("EXPORT_NAME reply %x", b)
	}
	rc.write(nbdproto.Request{Type: nbdproto.CmdRead, Cookie: 1, Length: 16}.Append(nil, false))
	h, _ := rc.reply()
	if h.Magic != nbdproto.SimpleReplyMagic || h.Errno != 0 {
		t.Fatalf("read reply %+v", h)
	}
	// An unknown name closes the connection without a reply.
	rc = dialRaw(t, uri)
	rc.write(append(nbdproto.OptHeader{Opt: nbdproto.OptExportName, Length: 1}.Append(nil), 'z'))
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
	rc.final(nbdproto.OptStructuredReply, nil)
	rc.goExport()
	const n = 64
	go func() {
		var b []byte
		for i := range n {
			b = nbdproto.Request{Type: nbdproto.CmdRead, Cookie: uint64(i), Offset: uint64(i) * 64 << 10, Length: 64 << 10, Flags: nbdproto.CmdFlagDF}.Append(b, false)
		}
		rc.c.Write(b)
	}()
	seen := map[uint64]bool{}
	for range n {
		h, p := rc.reply()
		if seen[h.Cookie] || h.Type != nbdproto.ReplyTypeOffsetData {
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
	c, err := nbdclient.Dial(context.Background(), uri, nbdclient.Options{StructuredReplies: true})
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
	pipe := func(opts nbdclient.Options) (*nbdclient.Client, error) {
		a, b := net.Pipe()
		go srv.ServeConn(context.Background(), b)
		return nbdclient.New(context.Background(), a, opts)
	}
	unix := func(opts nbdclient.Options) (*nbdclient.Client, error) {
		return nbdclient.Dial(context.Background(), uri, opts)
	}
	for name, dial := range map[string]func(nbdclient.Options) (*nbdclient.Client, error){"unix": unix, "pipe": pipe} {
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
	rc.final(nbdproto.OptStructuredReply, nil)
	rc.goExport()
	var b []byte
	for i := range 32 {
		b = nbdproto.Request{Type: nbdproto.CmdRead, Flags: nbdproto.CmdFlagDF, Cookie: uint64(i), Offset: uint64(i) << 20, Length: 1 << 20}.Append(b, false)
	}
	rc.write(b)
	closed := make(chan error, 1)
	got := 0
	seen := map[uint64]bool{}
	for {
		var hb [nbdproto.StructuredReplyLen]byte
		n, err := io.ReadFull(rc.r, hb[:])
		// Unread requests make the close a reset rather than an EOF.
		if n == 0 && got > 0 && (errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)) {
			break
		}
		if err != nil {
			t.Fatalf("after %d replies: partial or missing header: %v", got, err)
		}
		h, err := nbdproto.DecodeReplyHeader(hb[:])
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
	if _, err := nbdclient.Dial(context.Background(), uri, nbdclient.Options{ExportName: "bad"}); err == nil {
		t.Fatal("handshake with a broken export succeeded")
	}
	c, err := nbdclient.Dial(context.Background(), uri, nbdclient.Options{ExportName: "good", StructuredReplies: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.ReadAt(make([]byte, 512), 0); err != nil {
		t.Fatal(err)
	}
	c.Close()
}
