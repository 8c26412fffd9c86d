package nbdproto

import (
	"errors"
	"fmt"
	"io/fs"
	"syscall"
	"testing"
)

// TestErrno checks the mapping between NBD error values and system
// errors both ways, and that a ServerError matches its errno.
func TestErrno(t *testing.T) {
	for _, e := range []Errno{EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN} {
		if got := ErrnoOf(e.Syscall()); got != e {
			t.Errorf("ErrnoOf(%v.Syscall()) = %v", e, got)
		}
		se := &ServerError{Op: "NBD_CMD_WRITE", Errno: e}
		wrapped := fmt.Errorf("writing: %w", se)
		if !errors.Is(wrapped, e.Syscall()) || !errors.Is(wrapped, e) {
			t.Errorf("%v: ServerError does not match its errno", e)
		}
	}
	if s := Errno(1000).Syscall(); s != syscall.EINVAL {
		t.Errorf("unknown errno maps to %v, want EINVAL", s)
	}
	if errors.Is(&ServerError{Errno: EIO}, syscall.ENOSPC) {
		t.Error("EIO matches ENOSPC")
	}
	if errors.Is(&ServerError{Reply: RepErrUnsup}, syscall.EINVAL) {
		t.Error("an option error matches an errno")
	}
	for err, want := range map[error]Errno{
		nil: 0, syscall.EDQUOT: ENOSPC, syscall.EFBIG: ENOSPC, syscall.EROFS: EPERM,
		&fs.PathError{Op: "write", Path: "x", Err: syscall.ENOSPC}: ENOSPC,
		errors.Join(syscall.EIO, syscall.ENOSPC):                   ENOSPC, // a full disk is told first
		syscall.EBADF:                                              EIO, errors.New("x"): EIO,
	} {
		if got := ErrnoOf(err); got != want {
			t.Errorf("ErrnoOf(%v) = %v, want %v", err, got, want)
		}
	}
}
