package qcow2

import (
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// hostFile is an open file of the chain: the qcow2 file, its external data
// file, or a raw file. Only ReadAt and lseek are used, both safe for
// concurrent use.
type hostFile struct {
	name string
	f    *os.File
	role lockRole // how the chain uses the file, for its image locks (lock.go)
}

// openHost opens a file of the chain, read-only unless writable: nothing
// but an explicit request for writes ever opens a file for writing.
func openHost(name string, writable bool) (*hostFile, error) {
	flag := unix.O_RDONLY
	if writable {
		flag = unix.O_RDWR
	}
	// O_NONBLOCK so that a FIFO (or another special file) named as an
	// image or backing file cannot hang the open; anything but a regular
	// file or a block device is refused before it is read.
	fd, err := unix.Open(name, flag|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: name, Err: err}
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return nil, &os.PathError{Op: "stat", Path: name, Err: err}
	}
	if t := st.Mode & unix.S_IFMT; t != unix.S_IFREG && t != unix.S_IFBLK {
		unix.Close(fd)
		return nil, &FormatError{File: name, Offset: -1, Index: -1, Msg: "not a regular file or block device", Err: ErrUnsupported}
	}
	if err := unix.SetNonblock(fd, false); err != nil {
		unix.Close(fd)
		return nil, &os.PathError{Op: "fcntl", Path: name, Err: err}
	}
	return &hostFile{name: name, f: os.NewFile(uintptr(fd), name)}, nil
}

// length is the file's current size in bytes (for a block device, its
// size: stat reports 0 there).
func (h *hostFile) length() (int64, error) {
	fi, err := h.f.Stat()
	if err != nil {
		return 0, err
	}
	if fi.Mode().IsRegular() {
		return fi.Size(), nil
	}
	// Only pread/pwrite are used, so moving the file offset is harmless.
	return h.f.Seek(0, io.SeekEnd)
}

// allocated is st_blocks * 512, QEMU's bdrv_get_allocated_file_size().
func (h *hostFile) allocated() int64 {
	fi, err := h.f.Stat()
	if err != nil {
		return 0
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512
	}
	return 0
}

// readFull reads len(p) bytes at off; bytes past the end of the file read as
// zero, as QEMU's file-posix driver pads short reads.
func (h *hostFile) readFull(p []byte, off int64) error {
	n, err := h.f.ReadAt(p, off)
	if err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	clear(p[n:])
	return nil
}

// extent reports whether the host byte at off is in a data extent or a hole
// (SEEK_DATA/SEEK_HOLE, as QEMU's find_allocation()), and how far that lasts,
// at most n bytes. Where the file system cannot tell, QEMU assumes data.
func (h *hostFile) extent(off, n int64) (length int64, data bool) {
	fd := int(h.f.Fd())
	d, err := unix.Seek(fd, off, unix.SEEK_DATA)
	if err != nil {
		if errors.Is(err, unix.ENXIO) {
			return n, false // trailing hole
		}
		return n, true
	}
	if d > off {
		return min(d-off, n), false
	}
	if d < off {
		return n, true
	}
	hole, err := unix.Seek(fd, off, unix.SEEK_HOLE)
	if err != nil || hole <= off {
		return n, true
	}
	return min(hole-off, n), true
}

func (h *hostFile) close() error { return h.f.Close() }

// fileKey identifies a file by device and inode, so a backing chain that
// names the same file through different paths is still seen to loop.
func fileKey(fi os.FileInfo, name string) string {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return fmt.Sprintf("inode:%d:%d", st.Dev, st.Ino)
	}
	return name
}

// fcntlFlags returns the file's open flags (F_GETFL).
func fcntlFlags(h *hostFile) (int, error) {
	return unix.FcntlInt(h.f.Fd(), unix.F_GETFL, 0)
}
