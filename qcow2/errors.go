package qcow2

import (
	"errors"
	"fmt"
)

// Sentinel errors. Every error the engine returns for a bad image wraps one
// of them, so callers can classify with errors.Is.
var (
	// ErrNotQcow2 is returned when a file forced to be qcow2 has no qcow2
	// magic or an impossible version.
	ErrNotQcow2 = errors.New("not a qcow2 image")
	// ErrUnsupported names a feature the engine refuses to open
	// (encryption, unknown incompatible feature bits, unknown compression).
	ErrUnsupported = errors.New("unsupported image feature")
	// ErrCorrupt is a structural error in image metadata: a table past the
	// end of the file, an unaligned offset, a length out of range.
	ErrCorrupt = errors.New("corrupt image")
	// ErrBackingChain is a backing chain that loops, is too deep, or names a
	// file that cannot be opened.
	ErrBackingChain = errors.New("bad backing chain")
	// ErrReadOnly is returned by write operations on an image opened
	// without Options.Writable.
	ErrReadOnly = errors.New("image is read-only")
	// ErrNoBitmap is returned for a bitmap name the image does not have.
	ErrNoBitmap = errors.New("no such bitmap")
)

// FormatError is an error found in one file of the chain. It names the file,
// the byte offset in that file where the bad structure lives (-1 when it has
// none) and, where relevant, the index of the table entry.
type FormatError struct {
	File   string // path of the file that holds the bad structure
	Offset int64  // offset in File, or -1
	Index  int64  // table index, or -1
	Msg    string // what is wrong
	Err    error  // one of the sentinels above
}

func (e *FormatError) Error() string {
	s := e.File + ": " + e.Msg
	if e.Index >= 0 {
		s += fmt.Sprintf(" (index %d)", e.Index)
	}
	if e.Offset >= 0 {
		s += fmt.Sprintf(" (at offset %#x)", e.Offset)
	}
	return s
}

func (e *FormatError) Unwrap() error { return e.Err }

func corrupt(file string, off, idx int64, format string, args ...any) error {
	return &FormatError{File: file, Offset: off, Index: idx, Msg: fmt.Sprintf(format, args...), Err: ErrCorrupt}
}

func unsupported(file string, format string, args ...any) error {
	return &FormatError{File: file, Offset: -1, Index: -1, Msg: fmt.Sprintf(format, args...), Err: ErrUnsupported}
}
