package qcow2

import (
	"encoding/binary"
	"fmt"
)

// refcounts is the refcount bookkeeping of a writable qcow2 layer: the
// refcount table, the refcount blocks read or created so far, where free
// clusters may start, and the clusters to release after the next flush.
// Allocation scans refcounts from the hint, as QEMU's
// alloc_clusters_noref does, creating refcount blocks and growing the
// table when the file outgrows them.
//
// Nothing is marked clean before the fsync that made it durable returned
// successfully: a block whose write or fsync failed stays dirty.
type refcounts struct {
	name     string // the qcow2 file, for errors
	csize    int64
	cbits    uint
	order    uint32 // refcount_order
	perBlock int64  // refcount entries per block
	hdr      *Header
	io       refIO

	tableOffset   int64
	tableClusters int64
	table         []uint64 // the refcount table
	tableDirty    bool     // table (and the header's pointer to it) must be written
	blocks        map[int64][]byte
	dirty         map[int64]bool // blocks changed since they were last made durable
	freeHint      int64          // no free cluster below this index
	pending       []hostRange    // to release after the next flush
}

// refIO is how refcounts reaches the file: through the layer, so that a
// failed write or fsync makes the image fail and writes past the end of
// the file grow the layer's idea of its length.
type refIO struct {
	read    func(p []byte, off int64) error
	write   func(p []byte, off int64) error
	sync    func() error
	fileLen func() int64
}

type hostRange struct{ off, length int64 }

// loadRefcounts reads the refcount table the header points at.
func loadRefcounts(name string, hdr *Header, csize int64, cbits uint, io refIO) (*refcounts, error) {
	r := &refcounts{
		name: name, csize: csize, cbits: cbits, order: hdr.RefcountOrder, hdr: hdr, io: io,
		perBlock:      csize * 8 >> hdr.RefcountOrder,
		tableOffset:   int64(hdr.RefcountTableOffset),
		tableClusters: int64(hdr.RefcountTableClusters),
		blocks:        map[int64][]byte{},
		dirty:         map[int64]bool{},
	}
	n := r.tableClusters * csize / 8
	buf := make([]byte, n*8) // bounded by ParseHeader
	if err := io.read(buf, r.tableOffset); err != nil {
		return nil, err
	}
	r.table = make([]uint64, n)
	for i := range r.table {
		r.table[i] = binary.BigEndian.Uint64(buf[i*8:])
	}
	return r, nil
}

// block returns the refcount block at host offset off.
func (r *refcounts) block(off int64) ([]byte, error) {
	if b, ok := r.blocks[off]; ok {
		return b, nil
	}
	if off%r.csize != 0 || off > r.io.fileLen()-r.csize {
		return nil, corrupt(r.name, off, -1, "refcount block offset %#x invalid", off)
	}
	b := make([]byte, r.csize)
	if err := r.io.read(b, off); err != nil {
		return nil, err
	}
	r.blocks[off] = b
	return b, nil
}

// get returns the refcount of cluster c.
func (r *refcounts) get(c int64) (uint64, error) {
	idx := c / r.perBlock
	if idx >= int64(len(r.table)) {
		return 0, nil
	}
	off := int64(r.table[idx] & reftOffsetMask)
	if off == 0 {
		return 0, nil
	}
	b, err := r.block(off)
	if err != nil {
		return 0, err
	}
	return refcountAt(b, c%r.perBlock, r.order), nil
}

// exclusive reports whether the clusters under host bytes [host, host+n)
// each have refcount 1.
func (r *refcounts) exclusive(host, n int64) bool {
	for c := host >> r.cbits; c <= (host+n-1)>>r.cbits; c++ {
		if v, err := r.get(c); err != nil || v != 1 {
			return false
		}
	}
	return true
}

// set sets the refcount of cluster c, creating refcount blocks and
// growing the refcount table as needed.
func (r *refcounts) set(c int64, v uint64) error {
	if r.order < 6 && v >= 1<<(1<<r.order) {
		return fmt.Errorf("%s: refcount of cluster %d would overflow %d bits", r.name, c, 1<<r.order)
	}
	idx := c / r.perBlock
	if idx >= int64(len(r.table)) {
		if err := r.growTable(idx + 1); err != nil {
			return err
		}
	}
	off := int64(r.table[idx] & reftOffsetMask)
	if off == 0 {
		// A new refcount block; it describes itself when it falls in its
		// own range, otherwise the block that covers it does.
		b, err := r.findFree(1)
		if err != nil {
			return err
		}
		off = b * r.csize
		r.blocks[off] = make([]byte, r.csize)
		r.dirty[off] = true
		r.table[idx] = uint64(off)
		r.tableDirty = true
		r.freeHint = b + 1
		if err := r.set(b, 1); err != nil {
			return err
		}
	}
	blk, err := r.block(off)
	if err != nil {
		return err
	}
	setRefcountAt(blk, c%r.perBlock, r.order, v)
	r.dirty[off] = true
	return nil
}

// setRefcountAt is refcountAt's writing twin.
func setRefcountAt(b []byte, i int64, order uint32, v uint64) {
	switch order {
	case 0, 1, 2:
		bits := int64(1) << order
		per := 8 / bits
		shift := (i % per) * bits
		mask := byte(1<<bits-1) << shift
		b[i/per] = b[i/per]&^mask | byte(v)<<shift&mask
	case 3:
		b[i] = byte(v)
	case 4:
		binary.BigEndian.PutUint16(b[i*2:], uint16(v))
	case 5:
		binary.BigEndian.PutUint32(b[i*4:], uint32(v))
	default:
		binary.BigEndian.PutUint64(b[i*8:], v)
	}
}

// findFree finds n contiguous clusters with refcount 0 at or after the hint.
func (r *refcounts) findFree(n int64) (int64, error) {
	c := r.freeHint
	for i := int64(0); i < n; {
		v, err := r.get(c + i)
		if err != nil {
			return 0, err
		}
		if v != 0 {
			c, i = c+i+1, 0
			continue
		}
		i++
	}
	return c, nil
}

// alloc allocates n contiguous clusters and returns the host offset.
func (r *refcounts) alloc(n int64) (int64, error) {
	c, err := r.findFree(n)
	if err != nil {
		return 0, err
	}
	if (c+n)*r.csize > 1<<56 {
		return 0, fmt.Errorf("%s: image file would exceed 2^56 bytes", r.name)
	}
	r.freeHint = c + n
	for i := int64(0); i < n; i++ {
		if err := r.set(c+i, 1); err != nil {
			return 0, err
		}
	}
	return c * r.csize, nil
}

// release defers freeing host bytes [off, off+length) to the next flush,
// after the metadata that stopped pointing at them is durable.
func (r *refcounts) release(off, length int64) {
	r.pending = append(r.pending, hostRange{off, length})
}

// growTable moves the refcount table to a larger place (at least need
// entries); the old one is released after the next flush.
func (r *refcounts) growTable(need int64) error {
	perCluster := r.csize / 8
	entries := max(need, int64(len(r.table))*2)
	clusters := (entries + perCluster - 1) / perCluster
	if clusters*r.csize > maxRefTableBytes {
		return fmt.Errorf("%s: refcount table would exceed %d bytes", r.name, maxRefTableBytes)
	}
	start, err := r.findFree(clusters)
	if err != nil {
		return err
	}
	r.freeHint = start + clusters
	table := make([]uint64, clusters*perCluster)
	copy(table, r.table)
	r.release(r.tableOffset, r.tableClusters*r.csize)
	r.table, r.tableOffset, r.tableClusters, r.tableDirty = table, start*r.csize, clusters, true
	for i := int64(0); i < clusters; i++ {
		if err := r.set(start+i, 1); err != nil {
			return err
		}
	}
	return nil
}

// isDirty reports whether write or releasePending has anything to do.
func (r *refcounts) isDirty() bool {
	return len(r.dirty) > 0 || r.tableDirty || len(r.pending) > 0
}

// write makes the changed refcount blocks durable and then, if the table
// changed, the table and the header's pointer to it, each step fsynced
// before the next one points at it. Flags are cleared only once the last
// fsync succeeded.
func (r *refcounts) write() error {
	for _, off := range sortedKeys(r.dirty) {
		if err := r.io.write(r.blocks[off], off); err != nil {
			return err
		}
	}
	if err := r.io.sync(); err != nil {
		return err
	}
	if r.tableDirty {
		buf := make([]byte, len(r.table)*8)
		for i, v := range r.table {
			binary.BigEndian.PutUint64(buf[i*8:], v)
		}
		if err := r.io.write(buf, r.tableOffset); err != nil {
			return err
		}
		if err := r.io.sync(); err != nil {
			return err
		}
		if int64(r.hdr.RefcountTableOffset) != r.tableOffset || int64(r.hdr.RefcountTableClusters) != r.tableClusters {
			var h [12]byte
			binary.BigEndian.PutUint64(h[0:], uint64(r.tableOffset))
			binary.BigEndian.PutUint32(h[8:], uint32(r.tableClusters))
			if err := r.io.write(h[:], 48); err != nil {
				return err
			}
			if err := r.io.sync(); err != nil {
				return err
			}
			r.hdr.RefcountTableOffset, r.hdr.RefcountTableClusters = uint64(r.tableOffset), uint32(r.tableClusters)
		}
	}
	clear(r.dirty)
	r.tableDirty = false
	return nil
}

// releasePending drops one reference from every cluster released since the
// last flush (nothing on disk points at them any more) and writes the
// result. Freed clusters become allocatable again only then.
func (r *refcounts) releasePending() error {
	if len(r.pending) == 0 {
		return nil
	}
	hint := r.freeHint
	for _, p := range r.pending {
		for c := p.off >> r.cbits; c <= (p.off+p.length-1)>>r.cbits; c++ {
			v, err := r.get(c)
			if err != nil {
				return err
			}
			if v == 0 {
				return corrupt(r.name, c*r.csize, -1, "freeing cluster %#x whose refcount is already 0", c*r.csize)
			}
			if err := r.set(c, v-1); err != nil {
				return err
			}
			if v == 1 {
				hint = min(hint, c)
			}
		}
	}
	r.pending = nil
	if err := r.write(); err != nil {
		return err
	}
	r.freeHint = hint
	return nil
}
