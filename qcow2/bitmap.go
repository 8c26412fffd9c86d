package qcow2

import (
	"encoding/binary"
	"fmt"
	"sync"
)

// BitmapInfo describes one persistent dirty bitmap.
type BitmapInfo struct {
	Name        string `json:"name"`
	Granularity int64  `json:"granularity"`
	InUse       bool   `json:"in-use"` // not saved cleanly; QEMU treats it as inconsistent
	Auto        bool   `json:"auto"`   // enabled: tracks writes
	Layer       int    `json:"layer"`  // depth of the layer that holds it (1 = the opened image)
}

// Bitmap directory entry flags and limits (QEMU's qcow2-bitmap.c).
const (
	bmeFlagInUse        = 1 << 0
	bmeFlagAuto         = 1 << 1
	bmeFlagExtraCompat  = 1 << 2
	bmeReservedFlags    = ^uint32(bmeFlagInUse | bmeFlagAuto | bmeFlagExtraCompat)
	bmeTypeDirty        = 1
	bmeMinGranBits      = 9
	bmeMaxGranBits      = 31
	bmeMaxTableEntries  = 0x8000000  // BME_MAX_TABLE_SIZE
	bmeMaxPhysSize      = 0x20000000 // BME_MAX_PHYS_SIZE: bytes of bitmap data
	bmeMaxExtraData     = 1 << 20
	bmeEntryHeaderBytes = 24
	bmeTableOffsetMask  = 0x00fffffffffffe00
	bmeTableReserved    = 0xff000000000001fe
)

// bitmap is one entry of the bitmap directory.
type bitmap struct {
	info        BitmapInfo
	tableOffset int64
	tableSize   int64
	usable      bool  // exported: type dirty, not in use, no unknown extra data
	dirPos      int64 // offset of the directory entry in the file
	flags       uint32

	// mem is the whole bitmap while the image is open for writing (the
	// copy on disk is marked in_use and stale until Close stores it).
	mem []byte

	once  sync.Once // guards table, err
	table []uint64
	err   error
}

// DecodeBitmapDirectory decodes a bitmap directory (the bytes the bitmaps
// extension points at). Every length is checked against the buffer and
// against QEMU's limits; the bitmap tables themselves are validated when
// first used.
func DecodeBitmapDirectory(name string, dir []byte, dirOffset int64, n uint32, clusterSize, imageSize int64) ([]*bitmap, error) {
	be := binary.BigEndian
	var out []*bitmap
	seen := map[string]bool{}
	off := 0
	for i := uint32(0); i < n; i++ {
		at := dirOffset + int64(off)
		if len(dir)-off < bmeEntryHeaderBytes {
			return nil, corrupt(name, at, int64(i), "bitmap directory entry truncated")
		}
		e := dir[off:]
		b := &bitmap{
			dirPos:      at,
			tableOffset: int64(be.Uint64(e[0:])),
			tableSize:   int64(be.Uint32(e[8:])),
		}
		flags := be.Uint32(e[12:])
		typ := e[16]
		granBits := e[17]
		nameSize := int(be.Uint16(e[18:]))
		extra := int64(be.Uint32(e[20:]))
		if extra > bmeMaxExtraData {
			return nil, corrupt(name, at+20, int64(i), "bitmap extra data too large: %d bytes", extra)
		}
		if nameSize == 0 || nameSize > maxBitmapName {
			return nil, corrupt(name, at+18, int64(i), "bitmap name size %d out of range 1..%d", nameSize, maxBitmapName)
		}
		entryLen := (int64(bmeEntryHeaderBytes) + extra + int64(nameSize) + 7) &^ 7
		if entryLen > int64(len(dir)-off) {
			return nil, corrupt(name, at, int64(i), "bitmap directory entry (%d bytes) exceeds the directory", entryLen)
		}
		nm := string(e[bmeEntryHeaderBytes+extra : bmeEntryHeaderBytes+extra+int64(nameSize)])
		if seen[nm] {
			return nil, corrupt(name, at, int64(i), "duplicate bitmap name %q", nm)
		}
		seen[nm] = true
		if flags&bmeReservedFlags != 0 {
			return nil, corrupt(name, at+12, int64(i), "bitmap %q has reserved flags %#x", nm, flags)
		}
		if granBits < bmeMinGranBits || granBits > bmeMaxGranBits {
			return nil, corrupt(name, at+17, int64(i), "bitmap %q granularity 2^%d out of range 2^%d..2^%d", nm, granBits, bmeMinGranBits, bmeMaxGranBits)
		}
		if b.tableOffset < 0 || b.tableOffset%clusterSize != 0 {
			return nil, corrupt(name, at, int64(i), "bitmap %q table offset %#x unaligned or out of range", nm, uint64(b.tableOffset))
		}
		gran := int64(1) << granBits
		bits := (imageSize + gran - 1) / gran
		need := ((bits+7)/8 + clusterSize - 1) / clusterSize
		if b.tableSize > bmeMaxTableEntries || b.tableSize*clusterSize > bmeMaxPhysSize {
			return nil, corrupt(name, at+8, int64(i), "bitmap %q too large: %d table entries (%d bytes of bitmap data, QEMU's limit is %d)", nm, b.tableSize, b.tableSize*clusterSize, bmeMaxPhysSize)
		}
		if b.tableSize != need {
			return nil, corrupt(name, at+8, int64(i), "bitmap %q table has %d entries, image size needs %d", nm, b.tableSize, need)
		}
		if b.tableOffset == 0 {
			return nil, corrupt(name, at, int64(i), "bitmap %q has no table", nm)
		}
		if typ != bmeTypeDirty {
			return nil, corrupt(name, at+16, int64(i), "bitmap %q has unknown type %d", nm, typ)
		}
		b.flags = flags
		b.info = BitmapInfo{Name: nm, Granularity: gran, InUse: flags&bmeFlagInUse != 0, Auto: flags&bmeFlagAuto != 0}
		b.usable = !b.info.InUse && (extra == 0 || flags&bmeFlagExtraCompat != 0)
		out = append(out, b)
		off += int(entryLen)
	}
	return out, nil
}

func (q *qcow2Layer) loadBitmaps() error {
	h := q.hdr
	if !h.HasBitmapExt {
		return nil
	}
	if h.AutoclearFeatures&AutoclearBitmaps == 0 {
		q.warnf(SafeName(q.h.name) + ": a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent")
		return nil
	}
	dir := make([]byte, h.BitmapDirSize) // bounded and inside the file (ParseHeader)
	if err := q.readMeta(dir, int64(h.BitmapDirOffset)); err != nil {
		return err
	}
	bms, err := DecodeBitmapDirectory(q.h.name, dir, int64(h.BitmapDirOffset), h.NbBitmaps, q.csize, q.size_)
	if err != nil {
		return err
	}
	for _, b := range bms {
		b.info.Layer = q.depth
		if b.info.InUse {
			q.warnf(fmt.Sprintf("%s: bitmap %q is inconsistent (in use, not saved cleanly): not exported", SafeName(q.h.name), b.info.Name))
		} else if !b.usable {
			q.warnf(fmt.Sprintf("%s: bitmap %q has unknown extra data: not exported", SafeName(q.h.name), b.info.Name))
		}
	}
	q.bms = bms
	return nil
}

func (q *qcow2Layer) bitmaps() []BitmapInfo {
	var out []BitmapInfo
	for _, b := range q.bms {
		if b.usable {
			out = append(out, b.info)
		}
	}
	return out
}

// loadTable reads and validates a bitmap's table once.
func (q *qcow2Layer) loadTable(b *bitmap) ([]uint64, error) {
	b.once.Do(func() {
		n := b.tableSize
		if b.tableOffset > q.fileLen || n*8 > q.fileLen-b.tableOffset {
			b.err = corrupt(q.h.name, b.tableOffset, -1, "bitmap %q table (%d entries) past the end of the file", b.info.Name, n)
			return
		}
		buf := make([]byte, n*8)
		if b.err = q.readMeta(buf, b.tableOffset); b.err != nil {
			return
		}
		t := make([]uint64, n)
		for i := range t {
			e := binary.BigEndian.Uint64(buf[i*8:])
			off := int64(e & bmeTableOffsetMask)
			switch {
			case e&bmeTableReserved != 0 || (off != 0 && e&1 != 0):
				b.err = corrupt(q.h.name, b.tableOffset+int64(i)*8, int64(i), "bitmap %q table entry %#x has reserved bits set", b.info.Name, e)
			case off%q.csize != 0:
				b.err = corrupt(q.h.name, b.tableOffset+int64(i)*8, int64(i), "bitmap %q data cluster %#x unaligned", b.info.Name, off)
			case off != 0 && off > q.fileLen-q.csize:
				b.err = corrupt(q.h.name, b.tableOffset+int64(i)*8, int64(i), "bitmap %q data cluster %#x past the end of the file", b.info.Name, off)
			}
			if b.err != nil {
				return
			}
			t[i] = e
		}
		b.table = t
	})
	return b.table, b.err
}

// bitmapStatus walks [off, off+length) of bitmap name, reporting maximal
// dirty/clean runs. Bit i covers guest bytes [i*g, (i+1)*g); bits are
// stored least significant first within each byte.
func (q *qcow2Layer) bitmapStatus(name string, off, length int64, fn func(int64, int64, bool) error) error {
	var b *bitmap
	for _, x := range q.bms {
		if x.usable && x.info.Name == name {
			b = x
		}
	}
	if b == nil {
		return fmt.Errorf("%w: %q", ErrNoBitmap, name)
	}
	table, err := q.loadTable(b)
	if err != nil {
		return err
	}
	end := off + length
	if end > q.size_ {
		end = q.size_
	}
	g := b.info.Granularity
	bitsPerCluster := q.csize * 8
	var runStart int64 = off
	runDirty := false
	started := false
	emit := func(pos int64, dirty bool) error {
		// pos is where a run of state dirty begins.
		if !started {
			runStart, runDirty, started = pos, dirty, true
			return nil
		}
		if dirty == runDirty {
			return nil
		}
		if err := fn(runStart, pos-runStart, runDirty); err != nil {
			return err
		}
		runStart, runDirty = pos, dirty
		return nil
	}
	cluster := make([]byte, q.csize)
	loaded := int64(-1)
	for pos := off; pos < end; {
		bit := pos / g
		ci := bit / bitsPerCluster
		e := table[ci]
		clusterEnd := min(end, (ci+1)*bitsPerCluster*g)
		if b.mem == nil && e&bmeTableOffsetMask == 0 {
			if err := emit(pos, e&1 != 0); err != nil {
				return err
			}
			pos = clusterEnd
			continue
		}
		if loaded != ci {
			if b.mem != nil {
				cluster = b.mem[ci*q.csize : (ci+1)*q.csize]
			} else if err := q.readMeta(cluster, int64(e&bmeTableOffsetMask)); err != nil {
				return err
			}
			loaded = ci
		}
		for pos < clusterEnd {
			bit = pos / g
			i := bit - ci*bitsPerCluster
			by := cluster[i/8]
			if i%8 == 0 && (by == 0 || by == 0xff) {
				if err := emit(pos, by != 0); err != nil {
					return err
				}
				pos = min(clusterEnd, (bit+8)*g)
				continue
			}
			if err := emit(pos, by&(1<<(i%8)) != 0); err != nil {
				return err
			}
			pos = min(clusterEnd, (bit+1)*g)
		}
	}
	if started {
		return fn(runStart, end-runStart, runDirty)
	}
	return nil
}
