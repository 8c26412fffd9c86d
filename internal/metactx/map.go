package metactx

import (
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"

	"github.com/nbdgw/nbdgw/qcow2"
)

// This file is the one writer of nbdinfo --map output. `nbdgw map
// --context` (images and NBD URIs) and the FUSE maps/ files all produce
// their bytes through Map, so they cannot disagree with each other.

// Format selects one of the forms nbdinfo --map prints.
type Format struct {
	JSON   bool // nbdinfo --map --json
	Totals bool // nbdinfo --map --totals: bytes per type instead of extents
}

// Source delivers the extents of one context from offset off to the end
// of the export, in order and contiguous, calling fn for each; they need
// not be coalesced. If fn returns an error, the source stops and returns
// it. A Source may be called again from any offset it delivered an extent
// end at, and must then deliver the same extents from there.
type Source func(off int64, fn func(off, length int64, flags uint32) error) error

// ImageSource is the Source of context name of img: Walk to the end.
func ImageSource(img *qcow2.Image, name string) Source {
	return func(off int64, fn func(off, length int64, flags uint32) error) error {
		return Walk(img, name, off, img.Size()-off, fn)
	}
}

// WriteMap writes the whole map of context name of img in nbdinfo's text
// (or, with asJSON, JSON) form, streaming.
func WriteMap(w io.Writer, img *qcow2.Image, name string, asJSON bool) error {
	_, err := NewMap(name, Format{JSON: asJSON}, img.Size(), ImageSource(img, name)).WriteTo(w)
	return err
}

// mapChunk is how much output a Map generates at a time: what WriteTo
// writes per call, and how far beyond a read ReadAt runs before it pauses
// the source, so that resuming costs little per byte.
const mapChunk = 64 << 10

// errPause stops a source once the Map has generated enough.
var errPause = errors.New("pause")

// Map is the output of nbdinfo --map for one context of an export of
// size bytes, produced from src. It coalesces adjacent extents of equal
// flags (as nbdinfo does) and is resumable: it holds output bytes [pos,
// pos+len(buf)), the run being coalesced and, for totals, one counter per
// type seen; the source resumes at export offset next. Memory is bounded
// by one read plus one chunk, however long the map.
type Map struct {
	name string
	f    Format
	size int64
	src  Source

	co      coalescer
	totals  map[uint32]int64
	pos     int64  // output offset of buf[0]
	buf     []byte // generated, not yet consumed output
	next    int64  // export offset where the source resumes
	started bool   // the JSON opening bracket is out
	entries bool   // at least one entry is out (JSON separators)
	done    bool   // the source reached the end and the output is complete
}

// NewMap returns the map of context name in form f of an export of size
// bytes whose extents src delivers.
func NewMap(name string, f Format, size int64, src Source) *Map {
	m := &Map{name: name, f: f, size: size, src: src}
	m.co.fn = m.emit
	return m
}

func (m *Map) reset() {
	m.co = coalescer{fn: m.emit}
	m.totals = nil
	m.pos, m.buf, m.next = 0, m.buf[:0], 0
	m.started, m.entries, m.done = false, false, false
}

// WriteTo writes the whole map to w, a chunk at a time, as nbdinfo
// prints it. It may be called once, on a Map not yet read.
func (m *Map) WriteTo(w io.Writer) (int64, error) {
	var written int64
	err := m.generate(mapChunk, func() error {
		n, err := w.Write(m.buf)
		written += int64(n)
		m.pos += int64(len(m.buf))
		m.buf = m.buf[:0]
		return err
	})
	if err != nil {
		return written, err
	}
	n, err := w.Write(m.buf)
	written += int64(n)
	m.pos += int64(len(m.buf))
	m.buf = m.buf[:0]
	return written, err
}

// ReadAt fills p with output bytes from off, as io.ReaderAt does but
// returning 0 and no error at the end. Bytes before off are discarded: a
// later read below off restarts the source from the beginning.
func (m *Map) ReadAt(p []byte, off int64) (int, error) {
	if off < m.pos {
		m.reset()
	}
	want := off + int64(len(p))
	for !m.done && m.pos+int64(len(m.buf)) < want {
		// Drop what lies before off so that memory stays bounded by
		// one read plus one chunk.
		if skip := off - m.pos; skip > 0 {
			skip = min(skip, int64(len(m.buf)))
			m.buf = m.buf[:copy(m.buf, m.buf[skip:])]
			m.pos += skip
		}
		if err := m.generate(int(want-m.pos)+mapChunk, nil); err != nil {
			return 0, err
		}
	}
	if off >= m.pos+int64(len(m.buf)) {
		return 0, nil
	}
	return copy(p, m.buf[off-m.pos:]), nil
}

// generate appends output until buf holds at least target bytes (then,
// without drain, it pauses the source; with drain, it calls drain and
// goes on) or the map is complete.
func (m *Map) generate(target int, drain func() error) error {
	if !m.started {
		m.started = true
		if m.f.JSON {
			m.buf = append(m.buf, "[\n"...)
		}
	}
	if m.next < m.size {
		err := m.src(m.next, func(off, n int64, flags uint32) error {
			if off != m.next || n <= 0 {
				return fmt.Errorf("map of %s: extent [%d, +%d) where one at %d was expected", m.name, off, n, m.next)
			}
			n = min(n, m.size-off)
			_ = m.co.add(off, n, flags) // emit cannot fail
			m.next = off + n
			if len(m.buf) < target {
				return nil
			}
			if drain == nil {
				return errPause
			}
			return drain()
		})
		if err == errPause {
			return nil
		}
		if err != nil {
			return err
		}
		if m.next < m.size {
			return fmt.Errorf("map of %s: extents end at %d, before the end of the export at %d", m.name, m.next, m.size)
		}
	}
	_ = m.co.flush() // emit cannot fail
	if m.f.Totals {
		m.appendTotals()
	}
	if m.f.JSON {
		m.buf = append(m.buf, "\n]\n"...)
	}
	m.done = true
	return nil
}

// emit takes one coalesced run: a line of the map, or a count.
func (m *Map) emit(off, n int64, flags uint32) error {
	if m.f.Totals {
		if m.totals == nil {
			m.totals = make(map[uint32]int64)
		}
		m.totals[flags] += n
		return nil
	}
	if m.f.JSON {
		if m.entries {
			m.buf = append(m.buf, ",\n"...)
		}
		m.buf = appendJSON(m.buf, m.name, off, n, flags)
	} else {
		m.buf = AppendText(m.buf, m.name, off, n, flags)
	}
	m.entries = true
	return nil
}

// appendTotals appends what nbdinfo --map --totals prints: per type, in
// ascending order, the bytes of that type and their share of the export,
// "%10d %5.1f%% %3d description" or, in JSON,
// { "size": N, "percent": P, "type": N, "description": "..." }.
func (m *Map) appendTotals() {
	types := make([]uint32, 0, len(m.totals))
	for t := range m.totals {
		types = append(types, t)
	}
	slices.Sort(types)
	for _, t := range types {
		c := m.totals[t]
		percent := 100 * float64(c) / float64(m.size)
		d := Description(m.name, t)
		if m.f.JSON {
			if m.entries {
				m.buf = append(m.buf, ",\n"...)
			}
			m.buf = append(m.buf, `{ "size": `...)
			m.buf = strconv.AppendInt(m.buf, c, 10)
			m.buf = append(m.buf, `, "percent": `...)
			m.buf = strconv.AppendFloat(m.buf, percent, 'g', 6, 64) // C's %g
			m.buf = append(m.buf, `, "type": `...)
			m.buf = strconv.AppendUint(m.buf, uint64(t), 10)
			if d != "" {
				m.buf = append(m.buf, `, "description": `...)
				m.buf = strconv.AppendQuote(m.buf, d) // descriptions are plain ASCII
			}
			m.buf = append(m.buf, " }"...)
		} else {
			m.buf = appendPadded(m.buf, strconv.FormatInt(c, 10), 10)
			m.buf = append(m.buf, ' ')
			m.buf = appendPadded(m.buf, strconv.FormatFloat(percent, 'f', 1, 64), 5)
			m.buf = append(m.buf, "% "...)
			m.buf = appendPadded(m.buf, strconv.FormatUint(uint64(t), 10), 3)
			if d != "" {
				m.buf = append(m.buf, ' ')
				m.buf = append(m.buf, d...)
			}
			m.buf = append(m.buf, '\n')
		}
		m.entries = true
	}
}

// Description describes a flag value of context name, "" where there is
// no description. For base:allocation, qemu:allocation-depth and
// qemu:dirty-bitmap:NAME it is exactly what nbdinfo prints. For
// qemu:joint-allocation (which nbdinfo does not know) it is where the
// bytes come from, then their base:allocation description:
//
//	0 absent,data    4 local,data         8 backing,data
//	1 absent,hole    5 local,hole         9 backing,hole
//	2 absent,zero    6 local,zero        10 backing,zero
//	3 absent,hole,zero  7 local,hole,zero  11 backing,hole,zero
//
// "absent" (neither LOCAL nor BACKING) is allocation-depth's word for
// depth 0; LOCAL and BACKING together (no server sends it) read
// "local,backing,…". Values above 15 have no description.
func Description(name string, flags uint32) string {
	switch {
	case name == BaseAllocation:
		return baseDescription(flags)
	case strings.HasPrefix(name, DirtyBitmapPrefix):
		switch flags {
		case 0:
			return "clean"
		case StateDirty:
			return "dirty"
		}
	case name == AllocationDepth:
		switch flags {
		case 0:
			return "absent"
		case 1:
			return "local"
		default:
			return "backing depth " + strconv.FormatUint(uint64(flags), 10)
		}
	case name == JointAllocation:
		if flags > StateHole|StateZero|StateLocal|StateBacking {
			return ""
		}
		var where string
		switch flags & (StateLocal | StateBacking) {
		case 0:
			where = "absent"
		case StateLocal:
			where = "local"
		case StateBacking:
			where = "backing"
		default:
			where = "local,backing"
		}
		return where + "," + baseDescription(flags&(StateHole|StateZero))
	}
	return ""
}

// baseDescription is nbdinfo's description of a base:allocation value.
func baseDescription(flags uint32) string {
	switch flags {
	case 0:
		return "data"
	case StateHole:
		return "hole"
	case StateZero:
		return "zero"
	case StateHole | StateZero:
		return "hole,zero"
	}
	return ""
}

// AppendText appends one line of nbdinfo --map text output:
// "%10d  %10d  %3d  description\n" (no description column where there is
// none). Map writes its lines with it; tests that derive a map line by
// line from QEMU's answers format them with it too.
func AppendText(b []byte, name string, off, length int64, flags uint32) []byte {
	b = appendPadded(b, strconv.FormatInt(off, 10), 10)
	b = append(b, "  "...)
	b = appendPadded(b, strconv.FormatInt(length, 10), 10)
	b = append(b, "  "...)
	b = appendPadded(b, strconv.FormatUint(uint64(flags), 10), 3)
	if d := Description(name, flags); d != "" {
		b = append(b, "  "...)
		b = append(b, d...)
	}
	return append(b, '\n')
}

func appendPadded(b []byte, s string, width int) []byte {
	for i := len(s); i < width; i++ {
		b = append(b, ' ')
	}
	return append(b, s...)
}

// appendJSON appends one nbdinfo --map --json entry, without the
// separator: { "offset": N, "length": N, "type": N, "description": "..."}
func appendJSON(b []byte, name string, off, length int64, flags uint32) []byte {
	b = append(b, `{ "offset": `...)
	b = strconv.AppendInt(b, off, 10)
	b = append(b, `, "length": `...)
	b = strconv.AppendInt(b, length, 10)
	b = append(b, `, "type": `...)
	b = strconv.AppendUint(b, uint64(flags), 10)
	if d := Description(name, flags); d != "" {
		b = append(b, `, "description": `...)
		b = strconv.AppendQuote(b, d) // descriptions are plain ASCII
	}
	return append(b, '}')
}
