package nbdserver

import (
	"errors"
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

// zeroes pads file ranges that end past the end of their file.
var zeroes = make([]byte, 64<<10)

// sendFileRange sends n bytes of f at off on c. Bytes past the end of the
// file read as zeroes, as QEMU's file driver reads them.
func sendFileRange(c net.Conn, f *os.File, off, n int64) error {
	left, err := sendFile(c, f, off, n)
	if err != nil {
		return err
	}
	return writeZeroes(c, left)
}

// writeZeroes writes n zero bytes on c from the static buffer.
func writeZeroes(c net.Conn, n int64) error {
	for n > 0 {
		k := min(n, int64(len(zeroes)))
		if _, err := c.Write(zeroes[:k]); err != nil {
			return err
		}
		n -= k
	}
	return nil
}

// sendFile sends up to n bytes of f at off on c with sendfile(2), waiting
// for the socket to drain as needed. It returns how many bytes were left
// unsent because the file ended.
func sendFile(c net.Conn, f *os.File, off, n int64) (int64, error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return n, errors.New("nbd: connection cannot sendfile")
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return n, err
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
				return true // end of file: the caller pads with zeroes
			}
		}
		return true
	})
	if err != nil {
		return n, err
	}
	return n, serr
}
