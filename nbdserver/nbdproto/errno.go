package nbdproto

import (
	"errors"
	"fmt"
	"syscall"
)

// Errno is an NBD error value.
type Errno uint32

// NBD error values.
const (
	EPERM     Errno = 1
	EIO       Errno = 5
	ENOMEM    Errno = 12
	EINVAL    Errno = 22
	ENOSPC    Errno = 28
	EOVERFLOW Errno = 75
	ENOTSUP   Errno = 95
	ESHUTDOWN Errno = 108
)

var errnoNames = map[Errno]string{EPERM: "EPERM", EIO: "EIO", ENOMEM: "ENOMEM", EINVAL: "EINVAL",
	ENOSPC: "ENOSPC", EOVERFLOW: "EOVERFLOW", ENOTSUP: "ENOTSUP", ESHUTDOWN: "ESHUTDOWN"}

func (e Errno) String() string {
	if s, ok := errnoNames[e]; ok {
		return s
	}
	return fmt.Sprintf("errno %d", uint32(e))
}

func (e Errno) Error() string { return "nbd: " + e.String() }

// Syscall is the system error e stands for. An unknown value counts as
// NBD_EINVAL, as the protocol tells clients to treat it.
func (e Errno) Syscall() syscall.Errno {
	if _, ok := errnoNames[e]; ok {
		return syscall.Errno(e) // NBD took the values of Linux errno
	}
	return syscall.EINVAL
}

// Is makes errors.Is(e, syscall.EIO) hold for EIO, and so on.
func (e Errno) Is(target error) bool {
	t, ok := target.(syscall.Errno)
	return ok && e.Syscall() == t
}

// errnoOf lists, in the order they are tried, the system errors each NBD
// error value reports.
var errnoOf = []struct {
	nbd Errno
	sys []syscall.Errno
}{
	{ENOSPC, []syscall.Errno{syscall.ENOSPC, syscall.EDQUOT, syscall.EFBIG}}, // as the protocol asks
	{EPERM, []syscall.Errno{syscall.EPERM, syscall.EROFS}},
	{ENOMEM, []syscall.Errno{syscall.ENOMEM}},
	{EINVAL, []syscall.Errno{syscall.EINVAL}},
	{EOVERFLOW, []syscall.Errno{syscall.EOVERFLOW}},
	{ENOTSUP, []syscall.Errno{syscall.ENOTSUP}},
	{ESHUTDOWN, []syscall.Errno{syscall.ESHUTDOWN}},
}

// ErrnoOf is the NBD error value reporting err: the first of ENOSPC,
// EPERM, ENOMEM, EINVAL, EOVERFLOW, ENOTSUP and ESHUTDOWN whose system
// errors err matches (errors.Is, so an Errno in err's tree counts), else
// EIO; 0 for nil.
func ErrnoOf(err error) Errno {
	if err == nil {
		return 0
	}
	for _, m := range errnoOf {
		for _, s := range m.sys {
			if errors.Is(err, s) {
				return m.nbd
			}
		}
	}
	return EIO
}

// ServerError is an error reply from the server. A transmission error
// unwraps to its Errno, so errors.Is(err, syscall.ENOSPC) and
// errors.Is(err, ENOSPC) both tell a full disk.
type ServerError struct {
	Op    string
	Reply Reply  // option reply error, during the handshake
	Errno Errno  // transmission error
	Msg   string // the server's message, if any
}

func (e *ServerError) Error() string {
	s := "nbd: " + e.Op + ": "
	if e.Reply != 0 {
		s += e.Reply.String()
	} else {
		s += e.Errno.String()
	}
	if e.Msg != "" {
		s += ": " + e.Msg
	}
	return s
}

// Unwrap is the Errno of a transmission error, nil for an option error.
func (e *ServerError) Unwrap() error {
	if e.Errno == 0 {
		return nil
	}
	return e.Errno
}
