package qcow2

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// LayerInfo describes one layer of the chain, for nbdgw info: the facts
// qemu-img info prints for the node of that file opened alone (QEMU
// opens it with BDRV_O_NO_BACKING), and a few more.
type LayerInfo struct {
	Depth       int    // 1 = the opened image
	Filename    string // as QEMU names the node: the path given, backing names combined with it
	Format      string // "qcow2" or "raw"
	VirtualSize int64
	ActualSize  int64 // bytes allocated on the host (st_blocks * 512)
	FileLength  int64 // the file's length, rounded up to 512 as QEMU's bdrv_getlength()
	// Protocol is QEMU's protocol driver under the format: "file", or
	// "nbd" for an NBD export (NBDExportInfo), where QEMU knows no
	// allocated size and no dirty flag.
	Protocol string

	// qcow2 only.
	ClusterSize     int64
	Version         int    // 2 or 3
	BackingFile     string // the name in the header
	FullBackingFile string // BackingFile combined with Filename's directory
	BackingFormat   string // the backing format extension
	DataFileName    string // the external data file extension, as written
	DataFile        string // the external data file opened (resolved name)
	DataFileRaw     bool
	Compression     string
	ExtendedL2      bool
	LazyRefcounts   bool
	RefcountBits    int
	Features        []string // header feature bits by name
	Dirty           bool
	Corrupt         bool
	Bitmaps         []BitmapInfo // every bitmap of the directory, in its order
	Snapshots       []SnapshotInfo
}

// SnapshotInfo is one entry of a qcow2 internal snapshot table, as
// qemu-img info reports it.
type SnapshotInfo struct {
	ID          string
	Name        string
	VMStateSize int64
	DateSec     int64
	DateNsec    int64
	VMClockNsec int64
	ICount      int64 // -1: the entry does not record it
}

// ChainInfo is what nbdgw info prints: the chain, top layer first.
type ChainInfo struct {
	Layers []LayerInfo
	// MissingBacking is the backing file named by the last layer when it
	// does not exist and the image was opened with
	// Options.TolerateMissingBacking; "" otherwise.
	MissingBacking string
}

// Info describes the chain. It reads each qcow2 layer's snapshot table,
// which Open does not need.
func (img *Image) Info() (ChainInfo, error) {
	ci := ChainInfo{Layers: img.Layers(), MissingBacking: img.missingBacking}
	for i, l := range img.layers {
		if q, ok := l.(*qcow2Layer); ok {
			sn, err := q.snapshots()
			if err != nil {
				return ChainInfo{}, err
			}
			ci.Layers[i].Snapshots = sn
		}
	}
	return ci, nil
}

// InfoJSON is Info as nbdgw info --output=json prints it (the top layer,
// see ChainInfo.JSON): what the FUSE tree's info.json holds.
func (img *Image) InfoJSON() ([]byte, error) {
	ci, err := img.Info()
	if err != nil {
		return nil, err
	}
	return ci.JSON(false), nil
}

// NBDExportInfo is what qemu-img info reports for an NBD export of
// size bytes that QEMU names filename (raw over the nbd protocol driver).
func NBDExportInfo(filename string, size int64) ChainInfo {
	return ChainInfo{Layers: []LayerInfo{{Depth: 1, Filename: filename, Format: FormatRaw, Protocol: "nbd",
		VirtualSize: size, FileLength: size, ActualSize: -1}}}
}

// Snapshot table limits (QEMU's qcow2.h).
const (
	maxSnapshotExtra     = 1024
	maxSnapshotTableSize = 64 << 20
)

// snapshots reads the internal snapshot table as QEMU's
// qcow2_read_snapshots() does.
func (q *qcow2Layer) snapshots() ([]SnapshotInfo, error) {
	n := int(q.hdr.NbSnapshots)
	if n == 0 {
		return nil, nil
	}
	off := int64(q.hdr.SnapshotsOffset)
	// Bytes past the end of the file read as zeroes, as in QEMU; the
	// table is bounded as QEMU bounds it.
	read := func(p []byte, at int64) error {
		if at+int64(len(p))-int64(q.hdr.SnapshotsOffset) > maxSnapshotTableSize {
			return corrupt(q.h.name, int64(q.hdr.SnapshotsOffset), -1, "snapshot table (%d entries) larger than %d MiB", n, maxSnapshotTableSize>>20)
		}
		return q.readMeta(p, at)
	}
	out := make([]SnapshotInfo, 0, min(n, 1024))
	var hdr [40]byte
	for i := 0; i < n; i++ {
		off = (off + 7) &^ 7
		if err := read(hdr[:], off); err != nil {
			return nil, err
		}
		be := binary.BigEndian
		idLen, nameLen := int64(be.Uint16(hdr[12:])), int64(be.Uint16(hdr[14:]))
		extraLen := int64(be.Uint32(hdr[36:]))
		if extraLen > maxSnapshotExtra {
			return nil, corrupt(q.h.name, off+36, int64(i), "snapshot extra data of %d bytes (at most %d)", extraLen, maxSnapshotExtra)
		}
		sn := SnapshotInfo{
			DateSec:     int64(be.Uint32(hdr[16:])),
			DateNsec:    int64(be.Uint32(hdr[20:])),
			VMClockNsec: int64(be.Uint64(hdr[24:])),
			VMStateSize: int64(be.Uint32(hdr[32:])),
			ICount:      -1,
		}
		rest := make([]byte, extraLen+idLen+nameLen)
		if err := read(rest, off+40); err != nil {
			return nil, err
		}
		extra := rest[:extraLen]
		if len(extra) >= 8 {
			sn.VMStateSize = int64(be.Uint64(extra))
		}
		if len(extra) >= 24 {
			sn.ICount = int64(be.Uint64(extra[16:]))
		}
		// QEMU keeps them as C strings: they end at a NUL byte.
		sn.ID = cString(rest[extraLen : extraLen+idLen])
		sn.Name = cString(rest[extraLen+idLen:])
		out = append(out, sn)
		off += 40 + int64(len(rest))
	}
	return out, nil
}

// cString is b up to its first NUL byte.
func cString(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

func (q *qcow2Layer) info() LayerInfo {
	li := LayerInfo{
		Depth: q.depth, Filename: q.h.name, Format: "qcow2", Protocol: "file",
		VirtualSize: q.size_, ActualSize: q.h.allocated(), ClusterSize: q.csize,
		Version: int(q.hdr.Version), BackingFile: q.hdr.BackingFile, BackingFormat: q.hdr.BackingFormat,
		DataFileName:  q.hdr.DataFile,
		DataFileRaw:   q.hdr.AutoclearFeatures&AutoclearDataFileRaw != 0,
		Compression:   q.hdr.Compression.String(),
		ExtendedL2:    q.extL2,
		LazyRefcounts: q.hdr.CompatibleFeatures&1 != 0,
		RefcountBits:  1 << q.hdr.RefcountOrder,
		Features:      q.hdr.Features(),
		Dirty:         q.hdr.IncompatibleFeatures&IncompatDirty != 0,
		Corrupt:       q.hdr.IncompatibleFeatures&IncompatCorrupt != 0,
	}
	if n, err := q.h.length(); err == nil {
		li.FileLength = (n + 511) &^ 511
	}
	if li.BackingFile != "" {
		li.FullBackingFile = combinePath(q.h.name, li.BackingFile)
	}
	if q.hasDataFile {
		li.DataFile = q.data.name
	}
	for _, b := range q.bms {
		li.Bitmaps = append(li.Bitmaps, b.info)
	}
	return li
}

func (r *rawLayer) info() LayerInfo {
	return LayerInfo{Depth: r.depth, Filename: r.h.name, Format: "raw", Protocol: "file", VirtualSize: r.len, ActualSize: r.h.allocated(), FileLength: r.len}
}

// JSON is what nbdgw info --output=json prints, with a final newline:
// the top layer as qemu-img info --output=json prints it, or with chain
// every layer in a list as qemu-img info --backing-chain --output=json.
// Keys, nesting, order and spacing are QEMU 10's (see qobject); what
// nbdgw knows beyond qemu-img is under the key "nbdgw", last.
func (ci ChainInfo) JSON(chain bool) []byte {
	var b []byte
	if chain {
		var list qlist
		for _, l := range ci.Layers {
			list = append(list, l.qobject(ci, false))
		}
		b = appendQJSON(b, list, 0)
	} else {
		b = appendQJSON(b, ci.Layers[0].qobject(ci, true), 0)
	}
	return append(b, '\n')
}

// qobject is the layer as QEMU's BlockGraphInfo, members in QAPI order
// (qdict puts them in QEMU's print order). top adds the chain (the
// layers nbdgw opened, and the missing backing file that ends it, if
// any) to the "nbdgw" member.
//
// Left out because nbdgw does not compute them as QEMU's block layer
// does: "encrypted" (the engine refuses encrypted images), "compressed"
// (no driver nbdgw reads sets it), the file node's "extent-size-hint"
// (XFS only) and the external data file's node, which qemu-img info
// does not list either.
func (l LayerInfo) qobject(ci ChainInfo, top bool) qdict {
	if l.Protocol == "nbd" {
		// No "actual-size", "dirty-flag" or "format-specific": QEMU's nbd
		// driver has no bdrv_get_info or allocated file size. nbdgw knows
		// no more than qemu-img here: no "nbdgw" member.
		file := qdict{{"filename", l.Filename}, {"format", "nbd"}, {"virtual-size", l.FileLength}, {"children", qlist{}}}.qemuOrder()
		return qdict{{"filename", l.Filename}, {"format", l.Format}, {"virtual-size", l.VirtualSize},
			{"children", qlist{qdict{{"name", "file"}, {"info", file}}.qemuOrder()}}}.qemuOrder()
	}
	file := qdict{
		{"filename", l.Filename},
		{"format", "file"},
		{"dirty-flag", false},
		{"actual-size", l.ActualSize},
		{"virtual-size", l.FileLength},
		{"format-specific", qdict{{"type", "file"}, {"data", qdict{}}}.qemuOrder()},
		{"children", qlist{}},
	}.qemuOrder()
	d := qdict{
		{"filename", l.Filename},
		{"format", l.Format},
		{"dirty-flag", l.Dirty},
		{"actual-size", l.ActualSize},
		{"virtual-size", l.VirtualSize},
	}
	if l.Format == FormatQcow2 {
		d = append(d, qmember{"cluster-size", l.ClusterSize})
		if l.BackingFile != "" {
			d = append(d, qmember{"backing-filename", l.BackingFile}, qmember{"full-backing-filename", l.FullBackingFile})
			if l.BackingFormat != "" {
				d = append(d, qmember{"backing-filename-format", l.BackingFormat})
			}
		}
		if len(l.Snapshots) > 0 {
			var sl qlist
			for _, s := range l.Snapshots {
				sd := qdict{
					{"id", s.ID}, {"name", s.Name}, {"vm-state-size", s.VMStateSize},
					{"date-sec", s.DateSec}, {"date-nsec", s.DateNsec},
					{"vm-clock-sec", s.VMClockNsec / 1e9}, {"vm-clock-nsec", s.VMClockNsec % 1e9},
				}
				if s.ICount != -1 {
					sd = append(sd, qmember{"icount", s.ICount})
				}
				sl = append(sl, sd.qemuOrder())
			}
			d = append(d, qmember{"snapshots", sl})
		}
		d = append(d, qmember{"format-specific", qdict{{"type", "qcow2"}, {"data", l.qcow2Specific()}}.qemuOrder()})
	}
	d = append(d, qmember{"children", qlist{qdict{{"name", "file"}, {"info", file}}.qemuOrder()}})
	d = d.qemuOrder()

	nb := qdict{{"depth", l.Depth}}
	if l.Format == FormatQcow2 {
		nb = append(nb, qmember{"qcow2-version", l.Version})
		if len(l.Features) > 0 {
			fl := qlist{}
			for _, f := range l.Features {
				fl = append(fl, f)
			}
			nb = append(nb, qmember{"features", fl})
		}
		if l.DataFile != "" {
			nb = append(nb, qmember{"data-file-opened", l.DataFile})
		}
	}
	if top {
		var layers qlist
		for _, x := range ci.Layers {
			layers = append(layers, qdict{{"depth", x.Depth}, {"filename", x.Filename}, {"format", x.Format}})
		}
		nb = append(nb, qmember{"layers", layers})
		if ci.MissingBacking != "" {
			// The backing file the last of layers names, which does not
			// exist: the chain stops there.
			nb = append(nb, qmember{"missing-backing-file", ci.MissingBacking})
		}
	}
	return append(d, qmember{"nbdgw", nb})
}

// qcow2Specific is QEMU's ImageInfoSpecificQCow2 (qcow2_get_specific_info).
func (l LayerInfo) qcow2Specific() qdict {
	var d qdict
	if l.Version == 2 {
		d = qdict{{"compat", "0.10"}, {"refcount-bits", l.RefcountBits}}
	} else {
		d = qdict{{"compat", "1.1"}}
		if l.DataFileName != "" {
			d = append(d, qmember{"data-file", l.DataFileName})
		}
		if l.DataFile != "" {
			d = append(d, qmember{"data-file-raw", l.DataFileRaw})
		}
		d = append(d, qmember{"extended-l2", l.ExtendedL2},
			qmember{"lazy-refcounts", l.LazyRefcounts},
			qmember{"corrupt", l.Corrupt},
			qmember{"refcount-bits", l.RefcountBits})
		if len(l.Bitmaps) > 0 {
			var bl qlist
			for _, b := range l.Bitmaps {
				flags := qlist{}
				if b.InUse {
					flags = append(flags, "in-use")
				}
				if b.Auto {
					flags = append(flags, "auto")
				}
				bl = append(bl, qdict{{"name", b.Name}, {"granularity", b.Granularity}, {"flags", flags}}.qemuOrder())
			}
			d = append(d, qmember{"bitmaps", bl})
		}
	}
	d = append(d, qmember{"compression-type", l.Compression})
	return d.qemuOrder()
}

// Human is what nbdgw info prints: qemu-img info's human output
// (bdrv_node_info_dump), of the top layer or, with chain, of every
// layer separated by empty lines. Unlike qemu-img, names that are not
// printable (file, bitmap and snapshot names come from the image) are
// quoted as Go strings (SafeName): a terminal never sees them raw.
func (ci ChainInfo) Human(chain bool) string {
	var b strings.Builder
	for i, l := range ci.Layers {
		if !chain && i > 0 {
			break
		}
		if i > 0 {
			b.WriteString("\n")
		}
		l.human(&b)
	}
	return b.String()
}

func (l LayerInfo) human(b *strings.Builder) {
	disk := "unavailable"
	if l.ActualSize >= 0 {
		disk = sizeToStr(l.ActualSize)
	}
	fmt.Fprintf(b, "image: %s\nfile format: %s\nvirtual size: %s (%d bytes)\ndisk size: %s\n",
		SafeName(l.Filename), l.Format, sizeToStr(l.VirtualSize), l.VirtualSize, disk)
	if l.Format == FormatQcow2 {
		fmt.Fprintf(b, "cluster_size: %d\n", l.ClusterSize)
		if l.Dirty {
			b.WriteString("cleanly shut down: no\n")
		}
		if l.BackingFile != "" {
			fmt.Fprintf(b, "backing file: %s", SafeName(l.BackingFile))
			if l.FullBackingFile != l.BackingFile {
				fmt.Fprintf(b, " (actual path: %s)", SafeName(l.FullBackingFile))
			}
			b.WriteString("\n")
			if l.BackingFormat != "" {
				fmt.Fprintf(b, "backing file format: %s\n", SafeName(l.BackingFormat))
			}
		}
		if len(l.Snapshots) > 0 {
			b.WriteString("Snapshot list:\n")
			fmt.Fprintf(b, "%-7s %-16s %8s %19s %15s %10s\n", "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT")
			for _, s := range l.Snapshots {
				secs := s.VMClockNsec / 1e9
				clock := fmt.Sprintf("%04d:%02d:%02d.%03d", secs/3600, (secs/60)%60, secs%60, (s.VMClockNsec/1e6)%1000)
				icount := ""
				if s.ICount != -1 {
					icount = strconv.FormatInt(s.ICount, 10)
				}
				date := time.Unix(s.DateSec, 0).Local().Format("2006-01-02 15:04:05")
				fmt.Fprintf(b, "%-7s %-16s %8s %19s %15s %10s\n", SafeName(s.ID), SafeName(s.Name), sizeToStr(s.VMStateSize), date, clock, icount)
			}
		}
		b.WriteString("Format specific information:\n")
		dumpQObject(b, 1, l.qcow2Specific())
	}
	fmt.Fprintf(b, "Child node '/file':\n    filename: %s\n    protocol type: %s\n    file length: %s (%d bytes)\n    disk size: %s\n",
		SafeName(l.Filename), l.Protocol, sizeToStr(l.FileLength), l.FileLength, disk)
}

// sizeToStr is QEMU's size_to_str(): three significant digits and a
// binary prefix, switching up at 1000 of a unit.
func sizeToStr(v int64) string {
	suffixes := []string{"", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"}
	_, e := math.Frexp(float64(uint64(v)) / (1000.0 / 1024.0))
	i := (e - 1) / 10
	if i < 0 {
		i = 0
	}
	div := float64(uint64(1) << (i * 10))
	return fmt.Sprintf("%0.3g %sB", float64(uint64(v))/div, suffixes[i])
}

// dumpQObject is QEMU's dump_qobject() (block/qapi.c): the human form of
// format-specific data, keys with '-' shown as ' '.
func dumpQObject(b *strings.Builder, indent int, v any) {
	switch x := v.(type) {
	case qdict:
		for _, m := range x {
			fmt.Fprintf(b, "%*s%s:", indent*4, "", strings.ReplaceAll(m.key, "-", " "))
			dumpMember(b, indent, m.val)
		}
	case qlist:
		for i, e := range x {
			fmt.Fprintf(b, "%*s[%d]:", indent*4, "", i)
			dumpMember(b, indent, e)
		}
	case string:
		b.WriteString(SafeName(x))
	default:
		fmt.Fprintf(b, "%v", x)
	}
}

func dumpMember(b *strings.Builder, indent int, v any) {
	switch v.(type) {
	case qdict, qlist:
		b.WriteString("\n")
		dumpQObject(b, indent+1, v)
	default:
		b.WriteString(" ")
		dumpQObject(b, indent+1, v)
		b.WriteString("\n")
	}
}

// qdict, qlist and qmember model QEMU's QObjects for printing. Values
// are string, bool, int, int64, qdict or qlist.
type (
	qmember struct {
		key string
		val any
	}
	qdict []qmember
	qlist []any
)

// qdictHash is QEMU's tdb_hash() (qobject/qdict.c).
func qdictHash(s string) uint32 {
	v := uint32(0x238F13AF) * uint32(len(s))
	for i := 0; i < len(s); i++ {
		v += uint32(s[i]) << (uint(i*5) % 24)
	}
	return 1103515243*v + 12345
}

// qemuOrder puts the members of d, given in insertion order (the order in
// which QEMU's QAPI visitor adds them), in the order QEMU iterates a
// QDict: by hash bucket (of 512), the last inserted first within one.
func (d qdict) qemuOrder() qdict {
	out := make(qdict, len(d))
	copy(out, d)
	idx := map[string]int{}
	for i, m := range d {
		idx[m.key] = i
	}
	bucket := func(k string) uint32 { return qdictHash(k) % 512 }
	// Insertion sort: a handful of members.
	for i := 1; i < len(out); i++ {
		for j := i; j > 0; j-- {
			a, c := out[j-1], out[j]
			ba, bc := bucket(a.key), bucket(c.key)
			if ba < bc || ba == bc && idx[a.key] > idx[c.key] {
				break
			}
			out[j-1], out[j] = c, a
		}
	}
	return out
}

// appendQJSON is QEMU's qobject_to_json_pretty() (qobject/qjson.c).
func appendQJSON(b []byte, v any, indent int) []byte {
	nl := func(b []byte, n int) []byte {
		b = append(b, '\n')
		for i := 0; i < n; i++ {
			b = append(b, "    "...)
		}
		return b
	}
	switch x := v.(type) {
	case qdict:
		b = append(b, '{')
		for i, m := range x {
			if i > 0 {
				b = append(b, ',')
			}
			b = nl(b, indent+1)
			b = appendQString(b, m.key)
			b = append(b, ": "...)
			b = appendQJSON(b, m.val, indent+1)
		}
		b = nl(b, indent)
		return append(b, '}')
	case qlist:
		b = append(b, '[')
		for i, e := range x {
			if i > 0 {
				b = append(b, ',')
			}
			b = nl(b, indent+1)
			b = appendQJSON(b, e, indent+1)
		}
		b = nl(b, indent)
		return append(b, ']')
	case string:
		return appendQString(b, x)
	case bool:
		return strconv.AppendBool(b, x)
	case int:
		return strconv.AppendInt(b, int64(x), 10)
	case int64:
		return strconv.AppendInt(b, x, 10)
	}
	panic(fmt.Sprintf("qcow2: appendQJSON: %T", v))
}

// appendQString is QEMU's JSON string quoting: control characters and
// everything past ASCII as \uXXXX (surrogate pairs past the BMP), invalid
// UTF-8 as U+FFFD.
func appendQString(b []byte, s string) []byte {
	b = append(b, '"')
	for len(s) > 0 {
		r, n := utf8.DecodeRuneInString(s)
		s = s[n:]
		switch r {
		case '"':
			b = append(b, `\"`...)
		case '\\':
			b = append(b, `\\`...)
		case '\b':
			b = append(b, `\b`...)
		case '\f':
			b = append(b, `\f`...)
		case '\n':
			b = append(b, `\n`...)
		case '\r':
			b = append(b, `\r`...)
		case '\t':
			b = append(b, `\t`...)
		default:
			switch {
			case r < 0x20 || r >= 0x7f && r <= 0xffff:
				b = fmt.Appendf(b, `\u%04X`, r)
			case r > 0xffff:
				r -= 0x10000
				b = fmt.Appendf(b, `\u%04X\u%04X`, 0xd800|(r>>10), 0xdc00|(r&0x3ff))
			default:
				b = append(b, byte(r))
			}
		}
	}
	return append(b, '"')
}
