package qcow2

import (
	"errors"
	"fmt"
	"strconv"
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
	// ErrConfined is a file of the chain that Options.Confine refuses:
	// it resolves outside the confinement directory or is not a regular
	// file.
	ErrConfined = errors.New("file outside the confinement")
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
	s := SafeName(e.File) + ": " + e.Msg
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

// SafeName is how a file name is printed in messages and human-readable
// output: as it is when every byte is printable (so that paths look as the
// user typed them, and as QEMU prints them), else quoted in Go syntax
// (strconv.Quote), so that a name read from an image (a backing or data
// file name) cannot carry ESC, BEL, CR or LF to the terminal and forge
// lines or rewrite the screen. Names read from images that are not paths
// (bitmap names, the raw backing file name field) are always quoted (%q).
func SafeName(s string) string {
	if q := strconv.Quote(s); q[1:len(q)-1] != s {
		return q
	}
	return s
}
