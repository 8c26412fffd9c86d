package kernel

import (
	"errors"
	"fmt"
)

// Sentinel errors; test with errors.Is.
var (
	// ErrNotSupported: the running kernel has no nbd driver (neither built
	// in nor loadable as a module).
	ErrNotSupported = errors.New("the running kernel has no nbd support")
	// ErrBusy: the requested device is already connected.
	ErrBusy = errors.New("device is busy (already connected)")
	// ErrNoDevice: the device does not exist.
	ErrNoDevice = errors.New("no such nbd device")
	// ErrNotConnected: the device exists but is not connected.
	ErrNotConnected = errors.New("device is not connected")
	// ErrIndexRange: the device number is beyond what the driver allows.
	ErrIndexRange = errors.New("device index out of range")
)

// Error is the error type returned by the operations of this package. It
// wraps the cause (a sentinel above, a syscall.Errno, ...).
type Error struct {
	Op    string // "connect", "disconnect", "reconfigure", "status", "open", ...
	Index int    // device number, or -1 when not about one device
	Err   error
}

func (e *Error) Error() string {
	if e.Index >= 0 {
		return fmt.Sprintf("nbd %s %s: %v", e.Op, DevicePath(e.Index), e.Err)
	}
	return fmt.Sprintf("nbd %s: %v", e.Op, e.Err)
}

func (e *Error) Unwrap() error { return e.Err }
