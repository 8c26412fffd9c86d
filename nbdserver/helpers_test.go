package nbdserver

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/nbdgw/nbdgw/internal/metactx"
	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
	"github.com/nbdgw/nbdgw/qcow2"
)

// run runs a command, failing the test on error.
func run(t testing.TB, name string, args ...string) {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
}

// needTool skips the test when a program is missing.
func needTool(t testing.TB, names ...string) {
	t.Helper()
	for _, n := range names {
		if _, err := exec.LookPath(n); err != nil {
			t.Skipf("%s not installed", n)
		}
	}
}

// chainImage builds a two-layer qcow2 chain with data, zero clusters, a
// hole, backing data and a persistent bitmap "b0", and opens it.
func chainImage(t testing.TB) (*qcow2.Image, string) {
	t.Helper()
	needTool(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	base, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "8M")
	run(t, "qemu-io", "-c", "write -P 1 0 64k", "-c", "write -z 128k 64k", "-c", "write -P 5 4M 1M", base)
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
	run(t, "qemu-io", "-c", "write -P 2 64k 64k", "-c", "write -P 3 1M 1M", "-c", "write -z 4M 64k", top)
	run(t, "qemu-img", "bitmap", "--add", top, "b0")
	run(t, "qemu-io", "-c", "write -P 4 2M 64k", "-c", "write -P 6 7M 4k", top)
	img, err := qcow2.Open(top, qcow2.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() })
	return img, top
}

// rawImage opens a raw file of size bytes with data at the start; it
// needs no QEMU tools.
func rawImage(t testing.TB, size int) *qcow2.Image {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.raw")
	b := make([]byte, size)
	for i := range min(size, 64<<10) {
		b[i] = byte(i*7 + 1)
	}
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	img, err := qcow2.Open(p, qcow2.Options{Format: "raw"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() })
	return img
}

// startServer serves cfg on a unix socket and returns its URI.
func startServer(t testing.TB, cfg Config) (*Server, string) {
	t.Helper()
	if cfg.Logf == nil {
		cfg.Logf = t.Logf
	}
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := NewServer(cfg)
	done := make(chan error, 1)
	go func() { done <- srv.Serve(context.Background(), l) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-done; err != nil && !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve: %v", err)
		}
	})
	return srv, "nbd+unix:///?socket=" + sock
}

// span is one extent of a map.
type span struct {
	off, n int64
	flags  uint32
}

// coalesce merges adjacent spans of equal flags, as metactx.Walk does.
func coalesce(in []span) []span {
	var out []span
	for _, s := range in {
		if k := len(out) - 1; k >= 0 && out[k].flags == s.flags && out[k].off+out[k].n == s.off {
			out[k].n += s.n
			continue
		}
		out = append(out, s)
	}
	return out
}

// engineMap is the expected map of a context, from metactx.
func engineMap(t testing.TB, img *qcow2.Image, name string) []span {
	t.Helper()
	var out []span
	err := metactx.Walk(img, name, 0, img.Size(), func(off, n int64, f uint32) error {
		out = append(out, span{off, n, f})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// rawConn drives the protocol by hand, for misuse the Client never
// commits.
type rawConn struct {
	t testing.TB
	c net.Conn
	r *bufio.Reader
}

func dialRaw(t testing.TB, uri string) *rawConn {
	t.Helper()
	u, err := nbdproto.ParseURI(uri)
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial(u.Network, u.Address)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	rc := &rawConn{t: t, c: c, r: bufio.NewReader(c)}
	var hello [18]byte
	rc.read(hello[:])
	rc.write(be.AppendUint32(nil, nbdproto.ClientFixedNewstyle|nbdproto.ClientNoZeroes))
	return rc
}

func (rc *rawConn) write(b []byte) {
	rc.t.Helper()
	if _, err := rc.c.Write(b); err != nil {
		rc.t.Fatal(err)
	}
}

func (rc *rawConn) read(b []byte) {
	rc.t.Helper()
	if _, err := io.ReadFull(rc.r, b); err != nil {
		rc.t.Fatal(err)
	}
}

// option sends an option and collects the replies up to the final one
// (ACK or an error).
func (rc *rawConn) option(opt nbdproto.Option, data []byte) (replies []nbdproto.OptReply, payloads [][]byte) {
	rc.t.Helper()
	rc.write(append(nbdproto.OptHeader{Opt: opt, Length: uint32(len(data))}.Append(nil), data...))
	for {
		var hb [nbdproto.OptReplyHeaderLen]byte
		rc.read(hb[:])
		h, err := nbdproto.DecodeOptReply(hb[:])
		if err != nil {
			rc.t.Fatal(err)
		}
		p := make([]byte, h.Length)
		rc.read(p)
		replies, payloads = append(replies, h), append(payloads, p)
		if h.Type == nbdproto.RepAck || h.Type.IsError() {
			return replies, payloads
		}
	}
}

// final is the type of the last reply to an option.
func (rc *rawConn) final(opt nbdproto.Option, data []byte) nbdproto.Reply {
	rc.t.Helper()
	r, _ := rc.option(opt, data)
	return r[len(r)-1].Type
}

// goExport sends NBD_OPT_GO for the default export.
func (rc *rawConn) goExport() {
	rc.t.Helper()
	if got := rc.final(nbdproto.OptGo, nbdproto.InfoRequest{}.Append(nil)); got != nbdproto.RepAck {
		rc.t.Fatalf("NBD_OPT_GO: %v", got)
	}
}

// reply reads one reply header and its payload (not for simple READ
// replies, whose payload length the header does not carry).
func (rc *rawConn) reply() (nbdproto.ReplyHeader, []byte) {
	rc.t.Helper()
	var b [nbdproto.ExtendedReplyLen]byte
	rc.read(b[:4])
	n := nbdproto.ReplyHeaderLen(be.Uint32(b[:]))
	if n == 0 {
		rc.t.Fatalf("bad reply magic %#x", be.Uint32(b[:]))
	}
	rc.read(b[4:n])
	h, err := nbdproto.DecodeReplyHeader(b[:n])
	if err != nil {
		rc.t.Fatal(err)
	}
	if h.Length > 64<<20 {
		rc.t.Fatalf("reply chunk of %d bytes", h.Length)
	}
	p := make([]byte, h.Length)
	rc.read(p)
	return h, p
}

// replyErrno is the error a reply without data carries: a simple reply's
// errno, an NBD_REPLY_TYPE_ERROR chunk's, or 0 for NBD_REPLY_TYPE_NONE.
func replyErrno(t *testing.T, typ nbdproto.Command, h nbdproto.ReplyHeader, p []byte) nbdproto.Errno {
	t.Helper()
	switch {
	case h.Magic == nbdproto.SimpleReplyMagic:
		return h.Errno
	case h.Type == nbdproto.ReplyTypeError:
		errno, _, _ := nbdproto.DecodeErrorPayload(p)
		return errno
	case h.Type != nbdproto.ReplyTypeNone:
		t.Fatalf("%v: chunk type %d", typ, h.Type)
	}
	return 0
}
