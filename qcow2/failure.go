package qcow2

import (
	"errors"
	"fmt"
	"syscall"
)

// Errors stick (see "I/O errors" in the package documentation): both
// writers write and sync only through a wfile, which remembers the first
// failure and refuses everything after it.

// ErrFailed is wrapped by every error of a write, zero write, discard or
// flush on an image whose earlier write (pwrite) or fsync of a chain file
// failed. Such an image stays failed until it is closed and opened again:
// after a failed fsync Linux may have marked the unwritten pages clean, so a
// later fsync that succeeds proves nothing, and the metadata in memory may
// point at clusters whose refcounts never reached the disk. The error also
// wraps syscall.EIO and the first failure itself (so errors.Is finds
// syscall.ENOSPC when the disk was full). Reads go on.
var ErrFailed = errors.New("image failed")

// failure is the sticky error of a failed image.
type failure struct{ first error }

func (f *failure) Error() string {
	return "image failed after an I/O error; writes and flushes fail until it is reopened (first failure: " + f.first.Error() + ")"
}

func (f *failure) Unwrap() []error { return []error{ErrFailed, syscall.EIO, f.first} }

// wfile is the file a writer writes, with its sticky error: the first
// failed pwrite or fsync fails the image, and nothing is written or synced
// after it.
type wfile struct {
	h   *hostFile
	err error // *failure once failed
}

// failed returns the sticky error, or nil.
func (f *wfile) failed() error { return f.err }

func (f *wfile) fail(err error) error {
	if f.err == nil {
		f.err = &failure{first: err}
	}
	return f.err
}

func (f *wfile) pwrite(p []byte, off int64) error {
	if f.err != nil {
		return f.err
	}
	if _, err := f.h.f.WriteAt(p, off); err != nil {
		return f.fail(fmt.Errorf("%s: writing %d bytes at %#x: %w", f.h.name, len(p), off, err))
	}
	return nil
}

func (f *wfile) sync() error {
	if f.err != nil {
		return f.err
	}
	if err := f.h.f.Sync(); err != nil {
		return f.fail(fmt.Errorf("%s: fsync: %w", f.h.name, err))
	}
	return nil
}
