package qcow2

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// confiner is Options.Confine: every file of the chain must resolve,
// after symlinks, inside dir and be a regular file.
//
// The check is made on the file actually opened, not on its name: the
// name is opened with O_PATH (which opens nothing but the name: no device
// is woken, no FIFO waits, no lock is taken), the kernel is asked where
// that descriptor leads (readlink /proc/self/fd/N) and what it is
// (fstat), and only then is the file opened for I/O, through
// /proc/self/fd/N, which reopens that same inode without resolving the
// name again. A symlink swapped between the check and the open cannot
// redirect it.
type confiner struct {
	dir string // absolute, symlinks resolved
}

// newConfiner resolves the confinement directory: dir, or the directory
// of image when dir is "".
func newConfiner(image, dir string) (*confiner, error) {
	if dir == "" {
		dir = filepath.Dir(image)
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("--confine: %w", err)
	}
	real, err := filepath.EvalSymlinks(abs)
	if err != nil {
		return nil, fmt.Errorf("--confine: confinement directory: %w", err)
	}
	fi, err := os.Stat(real)
	if err != nil {
		return nil, fmt.Errorf("--confine: confinement directory: %w", err)
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("--confine: %s is not a directory", SafeName(real))
	}
	return &confiner{dir: real}, nil
}

// inside reports whether the resolved path p lies under c.dir.
func (c *confiner) inside(p string) bool {
	if c.dir == "/" {
		return strings.HasPrefix(p, "/")
	}
	return p == c.dir || strings.HasPrefix(p, c.dir+"/")
}

// check opens name with O_PATH and verifies the descriptor: it resolves
// inside the directory and is a regular file. what says where the name
// came from, for the message ("image top.qcow2", or `backing file name
// "b" (header of top.qcow2)`). It returns the O_PATH descriptor.
func (c *confiner) check(name, what string) (int, error) {
	fd, err := unix.Open(name, unix.O_PATH|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, &os.PathError{Op: "open", Path: SafeName(name), Err: err}
	}
	real, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
	if err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("--confine: cannot tell where %s leads (is /proc mounted?): %w", what, err)
	}
	if !c.inside(real) {
		unix.Close(fd)
		return -1, &confineError{fmt.Sprintf("%s resolves to %s, outside the confinement directory %s", what, SafeName(real), SafeName(c.dir))}
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return -1, &os.PathError{Op: "stat", Path: SafeName(name), Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		unix.Close(fd)
		return -1, &confineError{fmt.Sprintf("%s resolves to %s, which is not a regular file", what, SafeName(real))}
	}
	return fd, nil
}

// open opens a file of the chain: openHost(name), or with confinement
// the checked file through its O_PATH descriptor.
func (c *confiner) open(name, what string, writable bool) (*hostFile, error) {
	if c == nil {
		return openHost(name, writable)
	}
	fd, err := c.check(name, what)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	h, err := openHost("/proc/self/fd/"+strconv.Itoa(fd), writable)
	if err != nil {
		return nil, err
	}
	h.name = name
	return h, nil
}

// openPeek opens name read-only for a look at its first bytes, outside
// the chain: no lock is taken (openHost's hooks are not used).
func (c *confiner) openPeek(name, what string) (*os.File, error) {
	path := name
	if c != nil {
		fd, err := c.check(name, what)
		if err != nil {
			return nil, err
		}
		defer unix.Close(fd)
		path = "/proc/self/fd/" + strconv.Itoa(fd)
	}
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: SafeName(name), Err: err}
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG && st.Mode&unix.S_IFMT != unix.S_IFBLK {
		unix.Close(fd)
		return nil, nil // not for a peek: the real open reports it
	}
	return os.NewFile(uintptr(fd), name), nil
}

// whatName describes where a name of the chain came from, for messages.
func whatName(field, name, header string) string {
	return fmt.Sprintf("%s %q (header of %s)", field, name, SafeName(header))
}

// confineError is a refusal of Options.Confine. Its message names the
// file and the header field that named it, so it is not wrapped further.
type confineError struct{ msg string }

func (e *confineError) Error() string        { return e.msg }
func (e *confineError) Is(target error) bool { return target == ErrConfined }
