package nbdserver

import (
	"bytes"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestSendFileRange sends file ranges over a unix socket, including ones
// that run past the end of the file (zero padded).
func TestSendFileRange(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f")
	data := bytes.Repeat([]byte("0123456789abcdef"), 20000)
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	a, b, err := socketPair()
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	defer b.Close()
	for _, tc := range []struct{ off, n int64 }{{0, 1}, {3, 100000}, {int64(len(data)) - 10, 10}, {int64(len(data)) - 10, 70000}, {int64(len(data)) + 5, 3}} {
		want := make([]byte, tc.n)
		if tc.off < int64(len(data)) {
			copy(want, data[tc.off:])
		}
		errc := make(chan error, 1)
		go func() { errc <- sendFileRange(a, f, tc.off, tc.n) }()
		got := make([]byte, tc.n)
		if _, err := io.ReadFull(b, got); err != nil {
			t.Fatal(err)
		}
		if err := <-errc; err != nil {
			t.Fatalf("%+v: %v", tc, err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%+v: wrong bytes", tc)
		}
	}
}

// socketPair returns two connected unix sockets.
func socketPair() (net.Conn, net.Conn, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, err
	}
	var cs [2]net.Conn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		cs[i], err = net.FileConn(f)
		f.Close()
		if err != nil {
			return nil, nil, err
		}
	}
	return cs[0], cs[1], nil
}
