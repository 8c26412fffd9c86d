package qcow2

import (
	"encoding/binary"
	"fmt"
)

// Persistent bitmaps on a writable image, as QEMU keeps them: at open every
// consistent bitmap is loaded into memory and marked in_use on disk (a
// crash leaves it marked inconsistent); writes, zero writes and discards
// set the bits of enabled (auto) bitmaps; Close stores each bitmap back
// (clusters written, all-zero ones released) and clears in_use.

// maxBitmapMemory bounds the memory a writable open may spend on bitmaps.
const maxBitmapMemory = 256 << 20

// loadBitmapsForWriting loads every consistent bitmap and marks it in_use.
func (q *qcow2Layer) loadBitmapsForWriting() error {
	var total int64
	for _, b := range q.bms {
		if b.info.InUse {
			continue // already inconsistent: left alone, not tracked
		}
		if !b.usable {
			return unsupported(q.h.name, "bitmap %q has incompatible extra data: refusing to open for writing", b.info.Name)
		}
		total += b.tableSize * q.csize
		if total > maxBitmapMemory {
			return unsupported(q.h.name, "persistent bitmaps need more than %d bytes of memory to track writes", maxBitmapMemory)
		}
	}
	for _, b := range q.bms {
		if b.info.InUse {
			continue
		}
		table, err := q.loadTable(b)
		if err != nil {
			return err
		}
		mem := make([]byte, b.tableSize*q.csize)
		for i, e := range table {
			chunk := mem[int64(i)*q.csize : int64(i+1)*q.csize]
			switch off := int64(e & bmeTableOffsetMask); {
			case off != 0:
				if err := q.h.readFull(chunk, off); err != nil {
					return err
				}
			case e&1 != 0:
				for j := range chunk {
					chunk[j] = 0xff
				}
			}
		}
		b.mem = mem
	}
	return q.setInUse(true)
}

// setInUse sets or clears in_use on every tracked bitmap's directory entry
// and syncs.
func (q *qcow2Layer) setInUse(on bool) error {
	var buf [4]byte
	changed := false
	for _, b := range q.bms {
		if b.mem == nil {
			continue
		}
		f := b.flags &^ bmeFlagInUse
		if on {
			f |= bmeFlagInUse
		}
		binary.BigEndian.PutUint32(buf[:], f)
		if err := q.w.f.pwrite(buf[:], b.dirPos+12); err != nil {
			return fmt.Errorf("updating bitmap directory: %w", err)
		}
		changed = true
	}
	if !changed {
		return nil
	}
	return q.w.f.sync()
}

// markDirty sets the bits of [off, off+length) in every enabled bitmap.
func (q *qcow2Layer) markDirty(off, length int64) {
	if length <= 0 {
		return
	}
	for _, b := range q.bms {
		if b.mem == nil || !b.info.Auto {
			continue
		}
		g := b.info.Granularity
		for bit := off / g; bit <= (off+length-1)/g; bit++ {
			if bit%8 == 0 && bit+8 <= (off+length-1)/g+1 {
				b.mem[bit/8] = 0xff
				bit += 7
				continue
			}
			b.mem[bit/8] |= 1 << (bit % 8)
		}
	}
}

// storeBitmaps writes every tracked bitmap back (crash-safe like the rest
// of the metadata: data clusters and their refcounts, then the tables, then
// the release of clusters no longer used) and clears in_use.
func (q *qcow2Layer) storeBitmaps() error {
	w := q.w
	type update struct {
		b     *bitmap
		table []uint64
	}
	var updates []update
	for _, b := range q.bms {
		if b.mem == nil {
			continue
		}
		old, err := q.loadTable(b)
		if err != nil {
			return err
		}
		table := append([]uint64(nil), old...)
		for i := range table {
			chunk := b.mem[int64(i)*q.csize : int64(i+1)*q.csize]
			off := int64(old[i] & bmeTableOffsetMask)
			if allZero(chunk) {
				table[i] = 0
				if off != 0 {
					w.rc.release(off, q.csize)
				}
				continue
			}
			if off == 0 || !w.rc.exclusive(off, q.csize) {
				if off != 0 {
					w.rc.release(off, q.csize)
				}
				if off, err = w.rc.alloc(1); err != nil {
					return err
				}
			}
			if err := q.pwrite(chunk, off); err != nil {
				return err
			}
			table[i] = uint64(off)
		}
		updates = append(updates, update{b, table})
	}
	if len(updates) == 0 {
		return nil
	}
	if err := q.w.f.sync(); err != nil { // bitmap data
		return err
	}
	if err := w.rc.write(); err != nil { // new clusters' refcounts
		return err
	}
	for _, u := range updates {
		buf := make([]byte, len(u.table)*8)
		for i, e := range u.table {
			binary.BigEndian.PutUint64(buf[i*8:], e)
		}
		if err := q.pwrite(buf, u.b.tableOffset); err != nil {
			return err
		}
		u.b.table = u.table
	}
	if err := q.flush(); err != nil { // syncs, then releases the old clusters
		return err
	}
	return q.setInUse(false)
}

func allZero(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}
