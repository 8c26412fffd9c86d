// Package qemumap prints block-status entries exactly as QEMU 10.0's
// qemu-img map does (--output=json and human), with its merging rules. Both
// nbdgw map IMAGE and nbdgw map NBD-URI print through it.
//
// QEMU 7.2 and 10.0 differ in one thing here: 10.0's JSON entries carry
// "compressed" (true on compressed clusters, always false over NBD, which
// cannot say), and entries that differ in it are not merged. 7.2 printed
// no such field. The human output is the same in both. With "compressed"
// removed, qemu-img map of 7.2 and 10.0 print the same entries, in both
// forms, for local images and over NBD, on every image of the integration
// corpus. Over NBD, 10.0's client negotiates extended headers where the
// server grants them, so one request may span more than 4 GiB; it still
// asks for base:allocation only, so the map over NBD is unchanged (depth
// 0, offsets equal to the guest offsets).
package qemumap

import (
	"errors"
	"fmt"
	"io"
	"strconv"

	"github.com/nbdgw/nbdgw/qcow2"
)

// Entry is qemu-img's MapEntry.
type Entry struct {
	Start, Length int64
	Data, Zero    bool
	Depth         int64
	Present       bool
	Compressed    bool
	HasOffset     bool
	Offset        int64
	Filename      string // "" when QEMU's is NULL
}

// errCompressed is qemu-img's refusal to print human output for data it
// cannot map to a host offset.
var errCompressed = errors.New("file contains external, encrypted or compressed clusters")

// mergeable is qemu-img's entry_mergeable().
func (c *Entry) mergeable(n *Entry) bool {
	if c.Length == 0 {
		return false
	}
	if c.Zero != n.Zero || c.Data != n.Data || c.Depth != n.Depth || c.Present != n.Present ||
		c.Compressed != n.Compressed || c.Filename != n.Filename || c.HasOffset != n.HasOffset {
		return false
	}
	return !c.HasOffset || c.Offset+c.Length == n.Offset
}

// Writer prints entries exactly as qemu-img map (QEMU 10.0) does,
// including its merging and, for human output, its coalescing of zero
// entries. Entries must be added in order; Close prints the last one.
type Writer struct {
	w    io.Writer
	json bool
	cur  Entry
	buf  []byte
}

// NewWriter prints the opening line ("[" or the human header) and returns
// a Writer.
func NewWriter(w io.Writer, asJSON bool) (*Writer, error) {
	var err error
	if asJSON {
		_, err = io.WriteString(w, "[")
	} else {
		_, err = fmt.Fprintf(w, "%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File")
	}
	return &Writer{w: w, json: asJSON}, err
}

// Close prints the last entry and the closing line.
func (m *Writer) Close() error {
	if err := m.dump(&m.cur, nil); err != nil {
		return err
	}
	if m.json {
		_, err := io.WriteString(m.w, "]\n")
		return err
	}
	return nil
}

// Add merges n into the current entry or prints the current one.
func (m *Writer) Add(n Entry) error {
	if m.cur.mergeable(&n) {
		m.cur.Length += n.Length
		return nil
	}
	if m.cur.Length > 0 {
		if err := m.dump(&m.cur, &n); err != nil {
			return err
		}
	}
	m.cur = n
	return nil
}

// dump is qemu-img's dump_map_entry().
func (m *Writer) dump(e, next *Entry) error {
	b := m.buf[:0]
	if m.json {
		b = append(b, `{ "start": `...)
		b = strconv.AppendInt(b, e.Start, 10)
		b = append(b, `, "length": `...)
		b = strconv.AppendInt(b, e.Length, 10)
		b = append(b, `, "depth": `...)
		b = strconv.AppendInt(b, e.Depth, 10)
		b = append(b, `, "present": `...)
		b = strconv.AppendBool(b, e.Present)
		b = append(b, `, "zero": `...)
		b = strconv.AppendBool(b, e.Zero)
		b = append(b, `, "data": `...)
		b = strconv.AppendBool(b, e.Data)
		b = append(b, `, "compressed": `...)
		b = strconv.AppendBool(b, e.Compressed)
		if e.HasOffset {
			b = append(b, `, "offset": `...)
			b = strconv.AppendInt(b, e.Offset, 10)
		}
		b = append(b, '}')
		if next != nil {
			b = append(b, ",\n"...)
		}
	} else {
		if e.Data && !e.HasOffset {
			return errCompressed
		}
		if e.Data && !e.Zero {
			b = appendHex16(b, e.Start)
			b = appendHex16(b, e.Length)
			b = appendHex16(b, e.Offset)
			// qemu-img prints the name raw; a backing file name
			// from the image with control characters is quoted.
			b = append(b, qcow2.SafeName(e.Filename)...)
			b = append(b, '\n')
		}
		// qemu-img ignores the distinction between 0, ZERO and ZERO|DATA
		// here, to coalesce more.
		if next != nil && (!next.Data || next.Zero) {
			next.Data, next.Zero = false, true
		}
	}
	m.buf = b
	_, err := m.w.Write(b)
	return err
}

// appendHex16 is printf("%#-16"PRIx64): 0 prints as "0", others as 0x...
func appendHex16(b []byte, v int64) []byte {
	s := "0"
	if v != 0 {
		s = "0x" + strconv.FormatInt(v, 16)
	}
	b = append(b, s...)
	for i := len(s); i < 16; i++ {
		b = append(b, ' ')
	}
	return b
}

// WriteImage prints what qemu-img map prints for img.
func WriteImage(w io.Writer, img *qcow2.Image, asJSON bool) error {
	m, err := NewWriter(w, asJSON)
	if err != nil {
		return err
	}
	err = img.BlockStatus(0, img.Size(), func(e qcow2.Extent) error {
		n := Entry{Start: e.Start, Length: e.Length, Data: e.Data, Zero: e.Zero,
			Depth: int64(e.MapDepth), Present: e.Present, Compressed: e.Compressed, HasOffset: e.HasOffset, Offset: e.Offset}
		if e.HasOffset {
			n.Filename = e.File
		}
		return m.Add(n)
	})
	if err != nil {
		return err
	}
	return m.Close()
}
