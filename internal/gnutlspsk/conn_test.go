//go:build cgo

package gnutlspsk

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestLoadErrors(t *testing.T) {
	dir := t.TempDir()
	if _, err := Load(filepath.Join(dir, "missing")); err == nil || !strings.Contains(err.Error(), "no such file") {
		t.Errorf("missing file: %v", err)
	}
	p := filepath.Join(dir, "bad.psk")
	os.WriteFile(p, []byte("alice:xyz\n"), 0o600)
	if _, err := Load(p); err == nil || !strings.Contains(err.Error(), p+": line 1") {
		t.Errorf("bad file: %v", err)
	}
}

// pair is a connected pair of unix sockets.
func pair(t *testing.T) (a, b net.Conn) {
	t.Helper()
	l, err := net.Listen("unix", filepath.Join(t.TempDir(), "s"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ch := make(chan net.Conn, 1)
	go func() {
		c, _ := l.Accept()
		ch <- c
	}()
	a, err = net.Dial("unix", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	b = <-ch
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

func testKeys(t *testing.T) *Keys {
	k, err := parse([]byte("alice:00112233445566778899aabbccddeeff\nbob:ffee\n"))
	if err != nil {
		t.Fatal(err)
	}
	return k
}

type result struct {
	c   net.Conn
	err error
}

func handshake(t *testing.T, k *Keys, user string, key []byte) (srv, cli result) {
	a, b := pair(t)
	a.SetDeadline(time.Now().Add(10 * time.Second))
	b.SetDeadline(time.Now().Add(10 * time.Second))
	ch := make(chan result, 1)
	go func() {
		c, err := k.Server(b)
		ch <- result{c, err}
	}()
	c, err := Client(a, user, key)
	if err != nil {
		a.Close() // the server's handshake then ends too
	}
	return <-ch, result{c, err}
}

// TestTransfer: both directions at once, more than a record, through the
// client and server sides, then close_notify seen as io.EOF.
func TestTransfer(t *testing.T) {
	k := testKeys(t)
	key, _ := k.Key("alice")
	srv, cli := handshake(t, k, "alice", key)
	if srv.err != nil || cli.err != nil {
		t.Fatalf("server %v, client %v", srv.err, cli.err)
	}
	if u := srv.c.(*Conn).Username(); u != "alice" {
		t.Errorf("username %q", u)
	}
	t.Logf("negotiated %s", srv.c.(*Conn).Description())
	data := make([]byte, 3<<20)
	rand.Read(data)
	errs := make(chan error, 4)
	got := make([][]byte, 2)
	for i, c := range []net.Conn{srv.c, cli.c} {
		go func() { _, err := c.Write(data); errs <- err }()
		go func() {
			b := make([]byte, len(data))
			_, err := io.ReadFull(c, b)
			got[i] = b
			errs <- err
		}()
	}
	for range 4 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	for i := range got {
		if !bytes.Equal(got[i], data) {
			t.Errorf("side %d read other bytes", i)
		}
	}
	if err := cli.c.Close(); err != nil {
		t.Fatal(err)
	}
	if n, err := srv.c.Read(make([]byte, 10)); n != 0 || err != io.EOF {
		t.Errorf("read after the peer's close: %d, %v", n, err)
	}
	srv.c.Close()
	if _, err := srv.c.Read(make([]byte, 1)); !errors.Is(err, net.ErrClosed) {
		t.Errorf("read after close: %v", err)
	}
}

// TestRefused: a wrong key and an unknown username fail on both sides,
// and the server says which.
func TestRefused(t *testing.T) {
	k := testKeys(t)
	srv, cli := handshake(t, k, "alice", []byte{1, 2, 3})
	if srv.err == nil || cli.err == nil {
		t.Errorf("wrong key: server %v, client %v", srv.err, cli.err)
	} else {
		t.Logf("wrong key: server: %v; client: %v", srv.err, cli.err)
	}
	srv, cli = handshake(t, k, "carol", []byte{1, 2, 3})
	if srv.err == nil || cli.err == nil || !strings.Contains(srv.err.Error(), `unknown username "carol"`) {
		t.Errorf("unknown user: server %v, client %v", srv.err, cli.err)
	} else {
		t.Logf("unknown user: server: %v; client: %v", srv.err, cli.err)
	}
}

// TestPeerLeaves: a client that closes its socket in the handshake is
// io.EOF to the server (nbdserver does not log clients that left).
func TestPeerLeaves(t *testing.T) {
	k := testKeys(t)
	a, b := pair(t)
	b.SetDeadline(time.Now().Add(10 * time.Second))
	a.Write([]byte{0x16, 3, 1}) // the start of a ClientHello record
	a.Close()
	if _, err := k.Server(b); !errors.Is(err, io.EOF) {
		t.Errorf("server handshake with a peer that left: %v, want io.EOF", err)
	}
}

// TestDeadlines: a Read blocked on a silent peer ends at its deadline,
// and a Close from another goroutine ends a blocked Read.
func TestDeadlines(t *testing.T) {
	k := testKeys(t)
	key, _ := k.Key("bob")
	srv, cli := handshake(t, k, "bob", key)
	if srv.err != nil || cli.err != nil {
		t.Fatalf("server %v, client %v", srv.err, cli.err)
	}
	srv.c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if _, err := srv.c.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("read past the deadline: %v", err)
	}
	srv.c.SetReadDeadline(time.Time{})
	done := make(chan error, 1)
	go func() { _, err := srv.c.Read(make([]byte, 1)); done <- err }()
	time.Sleep(50 * time.Millisecond)
	srv.c.Close()
	select {
	case err := <-done:
		if err == nil {
			t.Error("read after close succeeded")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("close did not end a blocked read")
	}
	cli.c.Close()
}
