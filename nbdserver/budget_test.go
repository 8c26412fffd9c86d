package nbdserver

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nbdgw/nbdgw/nbdserver/nbdclient"
	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
	"github.com/nbdgw/nbdgw/qcow2"
)

// TestBudget: a connection's floor is its own, waiting is not first come
// first served, and the pool and per-connection limits hold.
func TestBudget(t *testing.T) {
	pool := newMemBudget(1 << 20)
	a, b := pool.conn(4<<20, 64<<10), pool.conn(4<<20, 64<<10)
	got := a.acquire(64<<10 + 1<<20) // the floor plus the whole pool
	if pool.used != 1<<20 {
		t.Fatalf("pool used %d after a floor plus 1 MiB, want 1 MiB", pool.used)
	}
	// b waits for a large amount; a small request of b's fits its floor
	// and must not queue behind it.
	large := make(chan struct{})
	go func() { b.release(b.acquire(512 << 10)); close(large) }()
	done := make(chan int64)
	go func() { done <- b.acquire(4096) }()
	select {
	case n := <-done:
		b.release(n)
	case <-time.After(5 * time.Second):
		t.Fatal("a 4 KiB request within the connection's floor waited behind a large one")
	}
	select {
	case <-large:
		t.Fatal("a 512 KiB request got through a full pool")
	case <-time.After(50 * time.Millisecond):
	}
	a.release(got)
	select {
	case <-large:
	case <-time.After(5 * time.Second):
		t.Fatal("the large request did not proceed once the pool was free")
	}
	if pool.used != 0 || a.used != 0 || b.used != 0 {
		t.Errorf("after all releases: pool %d, a %d, b %d", pool.used, a.used, b.used)
	}
	n := a.acquire(8 << 20)
	if n != 64<<10+1<<20 {
		t.Errorf("acquire beyond what can fit took %d, want it clipped to the floor plus the pool", n)
	}
	a.release(n)
	big := pool.conn(512<<10, 64<<10)
	if n := big.acquire(8 << 20); n != 512<<10 {
		t.Errorf("acquire beyond the connection's limit took %d, want it clipped to 512 KiB", n)
	}
}

// TestStreamedReadError: a large read through the engine is streamed in
// pieces; when a piece fails, structured replies answer it with an error
// chunk and keep the connection, simple replies drop the connection
// (the header promised the data). Reads before the bad part are intact.
func TestStreamedReadError(t *testing.T) {
	needTool(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	raw, img := filepath.Join(dir, "a.raw"), filepath.Join(dir, "c.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "raw", raw, "4M")
	run(t, "qemu-io", "-f", "raw", "-c", "write -q -P 7 0 4M", raw)
	run(t, "qemu-img", "convert", "-c", "-O", "qcow2", raw, img)
	// Garble the end of the file: compressed clusters are packed after
	// the metadata in guest order (each ~80 bytes here), so the last ones
	// no longer inflate and the first ones are intact.
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	fi, _ := f.Stat()
	f.WriteAt(bytes.Repeat([]byte{0xa5}, 512), fi.Size()-512)
	f.Close()
	image, err := qcow2.Open(img, qcow2.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer image.Close()
	srv := NewServer(Config{Exports: []*Export{{Image: image}}})
	defer srv.Close()
	for _, m := range modes {
		a, b := net.Pipe() // no sendfile: everything goes through the engine
		go srv.ServeConn(context.Background(), b)
		c, err := nbdclient.New(context.Background(), a, m.opts)
		if err != nil {
			t.Fatal(err)
		}
		first := make([]byte, 64<<10)
		if _, err := c.ReadAt(first, 0); err != nil || !bytes.Equal(first, bytes.Repeat([]byte{7}, len(first))) {
			t.Fatalf("%s: read of an intact cluster: %v", m.name, err)
		}
		_, err = c.ReadAt(make([]byte, 4<<20), 0)
		var se *nbdproto.ServerError
		switch {
		case err == nil:
			t.Errorf("%s: a read over garbled compressed clusters succeeded", m.name)
		case m.want == nbdproto.ModeSimple:
			if errors.As(err, &se) {
				t.Errorf("%s: got an error reply %v; a simple reply cannot carry a late error", m.name, err)
			}
		default:
			if !errors.As(err, &se) || se.Errno != nbdproto.EIO {
				t.Errorf("%s: read over garbled clusters: %v, want NBD_EIO", m.name, err)
			}
			if _, err := c.ReadAt(first, 0); err != nil {
				t.Errorf("%s: the connection did not survive the error chunk: %v", m.name, err)
			}
		}
		c.Close()
	}
}
