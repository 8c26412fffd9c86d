package nbdserver

import (
	"errors"
	"io"
	"net"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// canSendfile reports whether replies on c may carry file ranges: plain
// TCP and unix sockets can, TLS connections cannot.
func canSendfile(c net.Conn) bool {
	switch c.(type) {
	case *net.TCPConn, *net.UnixConn:
		return true
	}
	return false
}

// sendFile sends n bytes of f at off on c with sendfile(2), waiting for
// the socket to drain as needed.
func sendFile(c net.Conn, f *os.File, off, n int64) error {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return errors.New("nbd: connection cannot sendfile")
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return err
	}
	in := int(f.Fd())
	var serr error
	err = rc.Write(func(fd uintptr) bool {
		for n > 0 {
			k, err := unix.Sendfile(int(fd), in, &off, int(min(n, 1<<30)))
			if k > 0 {
				n -= int64(k)
			}
			switch {
			case err == unix.EAGAIN:
				return false // wait until writable
			case err == unix.EINTR:
			case err != nil:
				serr = err
				return true
			case k == 0:
				serr = io.ErrUnexpectedEOF // the file is shorter than its metadata says
				return true
			}
		}
		return true
	})
	if err != nil {
		return err
	}
	return serr
}
