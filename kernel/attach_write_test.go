package kernel

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
)

// kernelSend writes one request as the kernel does (payload for WRITE).
func kernelSend(c net.Conn, typ nbdproto.Command, flags nbdproto.CmdFlags, cookie, off uint64, length uint32, payload []byte) error {
	req := nbdproto.Request{Flags: flags, Type: typ, Cookie: cookie, Offset: off, Length: uint64(length)}.Append(nil, false)
	_, err := c.Write(append(req, payload...))
	return err
}

// kernelReply reads one simple reply without payload.
func kernelReply(c net.Conn, cookie uint64) error {
	var rep [16]byte
	if _, err := io.ReadFull(c, rep[:]); err != nil {
		return err
	}
	if m := binary.BigEndian.Uint32(rep[0:]); m != nbdproto.SimpleReplyMagic {
		return fmt.Errorf("reply magic %#x: not a simple reply", m)
	}
	if got := binary.BigEndian.Uint64(rep[8:]); got != cookie {
		return fmt.Errorf("cookie %d, want %d", got, cookie)
	}
	if e := binary.BigEndian.Uint32(rep[4:]); e != 0 {
		return fmt.Errorf("error %d", e)
	}
	return nil
}

// kernelCmd sends one request and waits for its reply.
func kernelCmd(c net.Conn, typ nbdproto.Command, flags nbdproto.CmdFlags, cookie, off uint64, length uint32, payload []byte) error {
	if err := kernelSend(c, typ, flags, cookie, off, length, payload); err != nil {
		return err
	}
	if err := kernelReply(c, cookie); err != nil {
		return fmt.Errorf("command %d at %d+%d: %w", typ, off, length, err)
	}
	return nil
}

// writeOp is one request of the write load and what it does to the shadow.
type writeOp struct {
	typ         nbdproto.Command
	flags       nbdproto.CmdFlags
	off, length int
	fill        byte // WRITE payload byte
}

// apply returns the request's payload and changes shadow as the request
// changes the device. TRIM leaves the range unspecified: trimmed marks it.
func (o writeOp) apply(shadow []byte, trimmed []bool) []byte {
	r := shadow[o.off : o.off+o.length]
	switch o.typ {
	case nbdproto.CmdWrite:
		p := bytes.Repeat([]byte{o.fill}, o.length)
		copy(r, p)
		clear(trimmed[o.off : o.off+o.length])
		return p
	case nbdproto.CmdWriteZeroes:
		clear(r)
		clear(trimmed[o.off : o.off+o.length])
	case nbdproto.CmdTrim:
		for i := range o.length {
			trimmed[o.off+i] = true
		}
	}
	return nil
}

// The write load: unaligned and cluster-sized writes into backing data and
// into holes, FUA, TRIM, and write zeroes with and without NO_HOLE.
var writeLoad = []writeOp{
	{nbdproto.CmdWrite, 0, 100000, 70000, 0x71},
	{nbdproto.CmdWrite, nbdproto.CmdFlagFUA, 2<<20 + 512, 4096, 0x72},
	{nbdproto.CmdWrite, 0, 1 << 20, 128 << 10, 0x73},
	{nbdproto.CmdTrim, 0, 1<<20 + 64<<10, 64 << 10, 0},
	{nbdproto.CmdWriteZeroes, 0, 3 << 20, 256 << 10, 0},
	{nbdproto.CmdWriteZeroes, nbdproto.CmdFlagNoHole, 3<<20 + 300<<10, 10000, 0},
	{nbdproto.CmdWrite, nbdproto.CmdFlagFUA, 4<<20 - 4096, 4096, 0x74},
	{nbdproto.CmdWrite, 0, 600 << 10, 1000, 0x75},
}

// qemuView returns the image's content and `qemu-img check`'s exit status
// and output, both with -U (the image is still open here).
func qemuView(t *testing.T, path string) ([]byte, string, error) {
	t.Helper()
	raw := filepath.Join(t.TempDir(), "view.raw")
	if out, err := exec.Command("qemu-img", "convert", "-U", "-O", "raw", path, raw).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert: %v\n%s", err, out)
	}
	got, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	out, cerr := exec.Command("qemu-img", "check", "-U", path).CombinedOutput()
	return got, string(out), cerr
}

// equalShadow compares got with shadow outside the trimmed ranges.
func equalShadow(got, shadow []byte, trimmed []bool) error {
	if len(got) != len(shadow) {
		return fmt.Errorf("%d bytes, want %d", len(got), len(shadow))
	}
	for i := range got {
		if got[i] != shadow[i] && !trimmed[i] {
			return fmt.Errorf("byte %d is %#x, want %#x", i, got[i], shadow[i])
		}
	}
	return nil
}

func fileSHA(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// TestAttachLocalWritable attaches a writable qcow2 overlay to the fake
// kernel, writes through the kernel's sockets as the nbd driver does, and
// checks the flags the kernel got, that the kernel's FLUSH makes the
// writes durable in the image, that detach and signals flush the image
// after the requests in flight were served, and that the backing file is
// never written.
func TestAttachLocalWritable(t *testing.T) {
	tests := []struct {
		name        string
		connections int
		flush       bool   // FUA in the load, NBD_CMD_FLUSH after it, and check the image then
		pipelined   bool   // leave the replies unread: the load is in flight at the stop
		stop        string // "detach" or "signal"
	}{
		{"one connection, flush, detach", 1, true, false, "detach"},
		{"two connections, no flush, signal", 2, false, false, "signal"},
		{"in flight at detach", 1, false, true, "detach"},
		{"three connections in flight at detach", 3, false, true, "detach"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path, want := testImage(t)
			base := filepath.Join(filepath.Dir(path), "base.qcow2")
			baseSum := fileSHA(t, base)
			img := openImageMode(t, path, true)
			k := &fakeKernel{t: t, index: 2}
			c := fakeKernelConn(t, k)
			a, err := Attach(context.Background(), c, AttachConfig{
				Image: img, Name: path, Index: AnyIndex, Connections: tt.connections, Writable: true,
			})
			if err != nil {
				t.Fatal(err)
			}
			k.mu.Lock()
			conns, flags := k.conns, k.serverFlags
			k.mu.Unlock()
			if len(conns) != tt.connections {
				t.Fatalf("kernel got %d sockets, want %d", len(conns), tt.connections)
			}
			wantFlags := uint64(nbdproto.FlagHasFlags | nbdproto.FlagSendFlush | nbdproto.FlagSendFUA | nbdproto.FlagSendTrim | nbdproto.FlagSendWriteZeroes | nbdproto.FlagCanMultiConn)
			if flags&wantFlags != wantFlags || flags&uint64(nbdproto.FlagReadOnly) != 0 {
				t.Errorf("server flags %#x: want %#x set and READ_ONLY clear", flags, wantFlags)
			}

			shadow := bytes.Clone(want)
			trimmed := make([]bool, len(shadow))
			// Each connection gets every len(conns)-th request, as the
			// kernel spreads requests over its sockets.
			var wg sync.WaitGroup
			errs := make([]error, len(conns))
			payloads := make([][]byte, len(writeLoad))
			ops := make([]writeOp, len(writeLoad))
			for i, op := range writeLoad {
				if !tt.flush {
					// No FUA either: only the stop can make the load durable.
					op.flags &^= nbdproto.CmdFlagFUA
				}
				ops[i] = op
				payloads[i] = op.apply(shadow, trimmed)
			}
			for ci, conn := range conns {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := ci; i < len(ops); i += len(conns) {
						op, cookie := ops[i], uint64(i+1)
						send := kernelCmd
						if tt.pipelined {
							send = kernelSend
						}
						if err := send(conn, op.typ, op.flags, cookie, uint64(op.off), uint32(op.length), payloads[i]); err != nil {
							errs[ci] = err
							return
						}
					}
				}()
			}
			wg.Wait()
			for _, err := range errs {
				if err != nil {
					t.Fatal(err)
				}
			}

			if tt.flush {
				if err := kernelCmd(conns[0], nbdproto.CmdFlush, 0, 100, 0, 0, nil); err != nil {
					t.Fatal(err)
				}
				// The kernel's FLUSH reached the image: another program
				// sees the writes while the device is still attached.
				got, out, cerr := qemuView(t, path)
				if err := equalShadow(got, shadow, trimmed); err != nil {
					t.Errorf("after NBD_CMD_FLUSH, qemu-img convert: %v", err)
				}
				if cerr != nil {
					t.Errorf("after NBD_CMD_FLUSH, qemu-img check: %v\n%s", cerr, out)
				}
			}

			stopAndWait(t, a, c, tt.stop, 2, 20*time.Second)
			// Wait flushed the image (it is not closed yet): everything
			// written, including what was in flight, is in the file.
			got, out, cerr := qemuView(t, path)
			if err := equalShadow(got, shadow, trimmed); err != nil {
				t.Errorf("after Wait, qemu-img convert: %v", err)
			}
			if cerr != nil {
				t.Errorf("after Wait, qemu-img check: %v\n%s", cerr, out)
			}
			if err := img.Close(); err != nil {
				t.Errorf("Close: %v", err)
			}
			if fileSHA(t, base) != baseSum {
				t.Error("the backing file changed")
			}
		})
	}
}

// TestAttachReadOnlyRefusesWrites: without Writable the kernel gets the
// read-only flag and a write that still arrives (the kernel would refuse it
// itself) fails without touching the image file.
func TestAttachReadOnlyRefusesWrites(t *testing.T) {
	path, _ := testImage(t)
	before := fileSHA(t, path)
	k := &fakeKernel{t: t, index: 4}
	c := fakeKernelConn(t, k)
	a, err := Attach(context.Background(), c, AttachConfig{Image: openImage(t, path), Index: AnyIndex})
	if err != nil {
		t.Fatal(err)
	}
	k.mu.Lock()
	conns, flags := k.conns, k.serverFlags
	k.mu.Unlock()
	if flags&uint64(nbdproto.FlagReadOnly) == 0 {
		t.Errorf("server flags %#x lack READ_ONLY", flags)
	}
	for i, op := range writeLoad[:3] {
		payload := op.apply(make([]byte, 4<<20), make([]bool, 4<<20))
		err := kernelCmd(conns[0], op.typ, op.flags, uint64(i+1), uint64(op.off), uint32(op.length), payload)
		if err == nil {
			t.Errorf("command %d at %d succeeded on a read-only device", op.typ, op.off)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := a.Wait(ctx); err != nil {
		t.Errorf("Wait: %v", err)
	}
	if fileSHA(t, path) != before {
		t.Error("the image file changed behind a read-only attach")
	}
}
