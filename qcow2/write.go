package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sort"
)

// Writes go to the top layer only. The design, in brief:
//
//   - Data is written to its host cluster at once; metadata (L2 tables, L1
//     entries, refcount blocks, the refcount table) changes in memory and
//     is written back by flush, in an order that keeps the image
//     consistent whenever the process or the machine stops: data is made
//     durable first, then refcount increments, then the L2 tables and L1
//     entries that point at the new clusters, and only then are clusters
//     that are no longer referenced released. A crash leaves at worst
//     leaked clusters (qemu-img check exit 3), never a reference to a
//     cluster with a zero refcount or to a cluster reused for other data.
//   - Freed clusters are not reused before the flush that releases them.
//   - New clusters are found by scanning refcounts from a hint, as QEMU's
//     alloc_clusters_noref does, growing refcount blocks and the table
//     when the file outgrows them.

// ZeroFlags modify WriteZeroes.
type ZeroFlags int

const (
	// ZeroMayUnmap lets the range be deallocated (NBD: no NO_HOLE flag).
	ZeroMayUnmap ZeroFlags = 1 << iota
	// ZeroFast fails with ErrNotFast, before changing anything, when
	// zeroing would mean writing zero bytes instead of changing metadata.
	ZeroFast
)

// ErrNotFast is returned by WriteZeroes with ZeroFast when zeroing the range
// would not be faster than writing zeroes.
var ErrNotFast = errors.New("zeroing this range is not fast")

// writer is the write side of a layer (the top one only).
type writer interface {
	writeAt(img *Image, p []byte, off int64) error
	writeZeroes(img *Image, off, length int64, flags ZeroFlags) error
	discard(img *Image, off, length int64) error
	flush() error
	// finish is the last flush, at Close (bitmaps are stored back).
	finish() error
}

// Dirty metadata beyond this many L2 tables is flushed before more writes.
const maxDirtyL2 = 256

// qwriter is the write state of a qcow2 layer. All of it is guarded by the
// image's lock held exclusively (reads hold it shared and look at l2Dirty).
type qwriter struct {
	q *qcow2Layer

	rtOffset   int64
	rtClusters int64
	rt         []uint64         // the refcount table
	rtDirty    bool             // rt (and the header's pointer to it) must be written
	rb         map[int64][]byte // refcount blocks read so far, by host offset
	rbDirty    map[int64]bool
	l2Dirty    map[int64][]byte // L2 tables changed since the last flush
	l1Dirty    map[int64]bool   // L1 indexes changed since the last flush
	perBlock   int64            // refcount entries per block
	freeHint   int64            // no free cluster below this index
	pending    []hostRange      // to release after the next flush
}

type hostRange struct{ off, length int64 }

// startWriting checks that the image can be written safely and sets up the
// write state. It refuses what it cannot keep consistent.
func (q *qcow2Layer) startWriting() error {
	h := q.hdr
	switch {
	case h.IncompatibleFeatures&IncompatDirty != 0:
		return unsupported(q.h.name, "image is marked dirty (refcounts may be stale): run 'qemu-img check -r all' before opening it for writing")
	case h.IncompatibleFeatures&IncompatCorrupt != 0:
		return unsupported(q.h.name, "image is marked corrupt: refusing to open it for writing (run 'qemu-img check -r all')")
	case h.NbSnapshots > 0:
		return unsupported(q.h.name, "writing to an image with internal snapshots is not supported (%d snapshots)", h.NbSnapshots)
	case q.hasDataFile:
		return unsupported(q.h.name, "writing to an image with an external data file is not supported")
	case h.Version < 3 && h.RefcountOrder != 4:
		return corrupt(q.h.name, 96, -1, "v2 image with refcount order %d", h.RefcountOrder)
	}
	w := &qwriter{
		q:          q,
		rtOffset:   int64(h.RefcountTableOffset),
		rtClusters: int64(h.RefcountTableClusters),
		rb:         map[int64][]byte{},
		rbDirty:    map[int64]bool{},
		l2Dirty:    map[int64][]byte{},
		l1Dirty:    map[int64]bool{},
		perBlock:   q.csize * 8 >> h.RefcountOrder,
	}
	n := w.rtClusters * q.csize / 8
	buf := make([]byte, n*8) // bounded by ParseHeader
	if err := q.h.readFull(buf, w.rtOffset); err != nil {
		return err
	}
	w.rt = make([]uint64, n)
	for i := range w.rt {
		w.rt[i] = binary.BigEndian.Uint64(buf[i*8:])
	}
	q.w = w
	if err := q.loadBitmapsForWriting(); err != nil {
		q.w = nil
		return err
	}
	return nil
}

func (q *qcow2Layer) writeAt(img *Image, p []byte, off int64) error {
	q.markDirty(off, int64(len(p)))
	for len(p) > 0 {
		m, err := q.lookup(off, int64(len(p)))
		if err != nil {
			return err
		}
		n := m.length
		switch {
		case m.typ == scNormal && q.exclusive(m.host, n):
			// Overwrite in place.
			if err := q.pwrite(p[:n], m.host); err != nil {
				return err
			}
		case !q.extL2 && (m.typ == scUnallocPlain || m.typ == scZeroPlain) && off&(q.csize-1) == 0 && n >= q.csize:
			// Whole clusters with no host cluster: allocate them together.
			n = min(n, int64(len(p))) &^ (q.csize - 1)
			if err := q.allocWrite(p[:n], off); err != nil {
				return err
			}
		default:
			n = min(n, q.csize-off&(q.csize-1))
			if err := q.writeCluster(img, p[:n], off); err != nil {
				return err
			}
		}
		p, off = p[n:], off+n
	}
	return q.w.maybeFlush()
}

// exclusive reports whether the host clusters under [host, host+n) each
// have refcount 1 (without snapshots they do; anything else is copied).
func (q *qcow2Layer) exclusive(host, n int64) bool {
	for c := host >> q.cbits; c <= (host+n-1)>>q.cbits; c++ {
		if r, err := q.w.getRef(c); err != nil || r != 1 {
			return false
		}
	}
	return true
}

func (q *qcow2Layer) pwrite(p []byte, host int64) error {
	if _, err := q.h.f.WriteAt(p, host); err != nil {
		return fmt.Errorf("%s: writing at %#x: %w", q.h.name, host, err)
	}
	if end := host + int64(len(p)); end > q.fileLen {
		q.fileLen, q.dataLen = end, end
	}
	return nil
}

// allocWrite writes whole clusters [off, off+len(p)) that have no host
// cluster: one allocation, one write, then the L2 entries.
func (q *qcow2Layer) allocWrite(p []byte, off int64) error {
	k := int64(len(p)) >> q.cbits
	host, err := q.w.alloc(k)
	if err != nil {
		return err
	}
	if err := q.pwrite(p, host); err != nil {
		return err
	}
	for i := int64(0); i < k; i++ {
		if err := q.setEntry(off+i*q.csize, uint64(host+i*q.csize)|oflagCopied, 0); err != nil {
			return err
		}
	}
	return nil
}

// cluster returns the current guest content of the cluster at gc (clipped
// to the image size, zero beyond), read through the whole chain.
func (q *qcow2Layer) currentContent(img *Image, gc, lo, hi int64) ([]byte, error) {
	buf := make([]byte, hi-lo)
	end := min(gc+hi, img.Size())
	if gc+lo < end {
		if err := img.readLayer(0, buf[:end-gc-lo], gc+lo); err != nil {
			return nil, err
		}
	}
	return buf, nil
}

// writeCluster writes p at off, inside one cluster, in every case that
// needs more than an overwrite: copy-on-write from the backing chain,
// replacing a compressed or shared cluster, filling a preallocated zero
// cluster, and extended L2 subclusters.
func (q *qcow2Layer) writeCluster(img *Image, p []byte, off int64) error {
	gc := off &^ (q.csize - 1)
	inC := off - gc
	e, bm, err := q.entryAt(gc)
	if err != nil {
		return err
	}
	host := int64(e & l2eOffsetMask)
	typ, _ := q.rangeType(e, bm, int(inC>>q.scBits))
	whole := e&oflagCompressed != 0 || (host != 0 && !q.exclusive(host, q.csize))
	if !q.extL2 || whole {
		// The whole cluster gets new content: keep the host cluster of a
		// preallocated zero cluster, allocate for anything else.
		newHost := host
		eof := (q.fileLen + q.csize - 1) &^ (q.csize - 1)
		if typ != scZeroAlloc || whole {
			if newHost, err = q.w.alloc(1); err != nil {
				return err
			}
		}
		// A cluster past the end of the file has never been written and
		// reads as zeroes: if the old content is zero too, only p needs
		// writing (QEMU avoids the copy-on-write the same way).
		zeroBase := typ == scZeroPlain || (typ == scUnallocPlain && q.chainReadsZero(img, gc))
		switch {
		case inC == 0 && int64(len(p)) == q.csize:
			err = q.pwrite(p, newHost)
		case zeroBase && newHost >= eof:
			err = q.pwrite(p, newHost+inC)
		default:
			var buf []byte
			if typ == scZeroAlloc || zeroBase {
				buf = make([]byte, q.csize)
			} else if buf, err = q.currentContent(img, gc, 0, q.csize); err != nil {
				return err
			}
			copy(buf[inC:], p)
			err = q.pwrite(buf, newHost)
		}
		if err != nil {
			return err
		}
		var nbm uint64
		if q.extL2 {
			nbm = 1<<q.scPerCluster - 1 // every subcluster allocated
		}
		if err := q.setEntry(gc, uint64(newHost)|oflagCopied, nbm); err != nil {
			return err
		}
		if newHost != host {
			q.w.release(e, host)
		}
		return nil
	}
	// Extended L2: write the touched subclusters, copying the untouched
	// parts of partly written ones from the current content.
	scs := int64(1) << q.scBits
	lo := inC &^ (scs - 1)
	hi := (inC + int64(len(p)) + scs - 1) &^ (scs - 1)
	buf := p
	if lo != inC || hi != inC+int64(len(p)) {
		if buf, err = q.currentContent(img, gc, lo, hi); err != nil {
			return err
		}
		copy(buf[inC-lo:], p)
	}
	if host == 0 {
		if host, err = q.w.alloc(1); err != nil {
			return err
		}
	}
	if err := q.pwrite(buf, host+lo); err != nil {
		return err
	}
	for s := lo / scs; s < hi/scs; s++ {
		bm |= 1 << s
		bm &^= 1 << (32 + s)
	}
	return q.setEntry(gc, uint64(host)|oflagCopied, bm)
}

// chainReadsZero reports whether the cluster at gc reads as zeroes through
// the layers below the top one (or is past their end).
func (q *qcow2Layer) chainReadsZero(img *Image, gc int64) bool {
	if len(img.layers) == 1 {
		return true
	}
	zero := true
	m := merger{fn: func(e Extent) error {
		zero = zero && e.Zero
		return nil
	}}
	end := min(gc+q.csize, img.layers[1].size())
	if gc < end {
		if img.walk(1, gc, end, &m) != nil || m.flush() != nil {
			return false
		}
	}
	return zero
}

// release defers freeing the host clusters an L2 entry no longer uses.
func (w *qwriter) release(e uint64, host int64) {
	q := w.q
	switch {
	case e&oflagCompressed != 0:
		coff := int64(e&l2eCompressedMask&q.coffMask) &^ 511
		nsect := int64((e&l2eCompressedMask)>>q.csizeShift&q.csizeMask) + 1
		w.pending = append(w.pending, hostRange{coff, nsect * 512})
	case host != 0:
		w.pending = append(w.pending, hostRange{host, q.csize})
	}
}

// entryAt returns the L2 entry of the cluster at guest offset gc (zero if
// its L2 table does not exist).
func (q *qcow2Layer) entryAt(gc int64) (uint64, uint64, error) {
	l1i := gc / (q.csize * q.l2Entries)
	if l1i >= q.l1.len() {
		return 0, 0, fmt.Errorf("qcow2: offset %#x beyond the L1 table", gc)
	}
	l2off := int64(q.l1.get(l1i) & l1eOffsetMask)
	if l2off == 0 {
		return 0, 0, nil
	}
	if _, err := q.lookup(gc, 1); err != nil { // validates the table and entry
		return 0, 0, err
	}
	t, err := q.l2Table(l2off)
	if err != nil {
		return 0, 0, err
	}
	e, bm := q.entry(t, (gc>>q.cbits)&(q.l2Entries-1))
	return e, bm, nil
}

// setEntry changes the L2 entry of the cluster at guest offset gc,
// creating its L2 table if needed. The change is written back by flush.
func (q *qcow2Layer) setEntry(gc int64, e, bm uint64) error {
	w := q.w
	l1i := gc / (q.csize * q.l2Entries)
	l2off := int64(q.l1.get(l1i) & l1eOffsetMask)
	var t []byte
	if l2off == 0 {
		var err error
		if l2off, err = w.alloc(1); err != nil {
			return err
		}
		t = make([]byte, q.csize)
		q.l1.set(l1i, uint64(l2off)|oflagCopied)
		w.l1Dirty[l1i] = true
	} else if t = w.l2Dirty[l2off]; t == nil {
		if !w.exclusiveTable(l2off) {
			return corrupt(q.h.name, int64(q.hdr.L1TableOffset)+l1i*8, l1i, "L2 table %#x is shared (refcount > 1) in an image without snapshots", l2off)
		}
		old, err := q.l2Table(l2off)
		if err != nil {
			return err
		}
		t = append([]byte(nil), old...) // readers may hold the cached one
		if q.l1.get(l1i)&oflagCopied == 0 {
			q.l1.set(l1i, q.l1.get(l1i)|oflagCopied)
			w.l1Dirty[l1i] = true
		}
	}
	i := (gc >> q.cbits) & (q.l2Entries - 1)
	binary.BigEndian.PutUint64(t[i*q.esize:], e)
	if q.extL2 {
		binary.BigEndian.PutUint64(t[i*q.esize+8:], bm)
	}
	w.l2Dirty[l2off] = t
	return nil
}

func (w *qwriter) exclusiveTable(off int64) bool {
	r, err := w.getRef(off >> w.q.cbits)
	return err == nil && r == 1
}

func (w *qwriter) maybeFlush() error {
	if len(w.l2Dirty) > maxDirtyL2 {
		return w.flush()
	}
	return nil
}

// ---- refcounts and allocation ----

// block returns the refcount block at host offset off.
func (w *qwriter) block(off int64) ([]byte, error) {
	if b, ok := w.rb[off]; ok {
		return b, nil
	}
	q := w.q
	if off%q.csize != 0 || off > q.fileLen-q.csize {
		return nil, corrupt(q.h.name, off, -1, "refcount block offset %#x invalid", off)
	}
	b := make([]byte, q.csize)
	if err := q.h.readFull(b, off); err != nil {
		return nil, err
	}
	w.rb[off] = b
	return b, nil
}

func (w *qwriter) getRef(c int64) (uint64, error) {
	idx := c / w.perBlock
	if idx >= int64(len(w.rt)) {
		return 0, nil
	}
	off := int64(w.rt[idx] & reftOffsetMask)
	if off == 0 {
		return 0, nil
	}
	b, err := w.block(off)
	if err != nil {
		return 0, err
	}
	return refcountAt(b, c%w.perBlock, w.q.hdr.RefcountOrder), nil
}

// setRef sets the refcount of cluster c, creating refcount blocks and
// growing the refcount table as needed.
func (w *qwriter) setRef(c int64, v uint64) error {
	order := w.q.hdr.RefcountOrder
	if order < 6 && v >= 1<<(1<<order) {
		return fmt.Errorf("%s: refcount of cluster %d would overflow %d bits", w.q.h.name, c, 1<<order)
	}
	idx := c / w.perBlock
	if idx >= int64(len(w.rt)) {
		if err := w.growTable(idx + 1); err != nil {
			return err
		}
	}
	off := int64(w.rt[idx] & reftOffsetMask)
	if off == 0 {
		// A new refcount block; it describes itself when it falls in its
		// own range, otherwise the block that covers it does.
		b, err := w.findFree(1)
		if err != nil {
			return err
		}
		off = b * w.q.csize
		w.rb[off] = make([]byte, w.q.csize)
		w.rbDirty[off] = true
		w.rt[idx] = uint64(off)
		w.rtDirty = true
		w.freeHint = b + 1
		if err := w.setRef(b, 1); err != nil {
			return err
		}
	}
	blk, err := w.block(off)
	if err != nil {
		return err
	}
	setRefcountAt(blk, c%w.perBlock, order, v)
	w.rbDirty[off] = true
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
func (w *qwriter) findFree(n int64) (int64, error) {
	c := w.freeHint
	for i := int64(0); i < n; {
		r, err := w.getRef(c + i)
		if err != nil {
			return 0, err
		}
		if r != 0 {
			c, i = c+i+1, 0
			continue
		}
		i++
	}
	return c, nil
}

// alloc allocates n contiguous clusters and returns the host offset.
func (w *qwriter) alloc(n int64) (int64, error) {
	c, err := w.findFree(n)
	if err != nil {
		return 0, err
	}
	if (c+n)*w.q.csize > 1<<56 {
		return 0, fmt.Errorf("%s: image file would exceed 2^56 bytes", w.q.h.name)
	}
	w.freeHint = c + n
	for i := int64(0); i < n; i++ {
		if err := w.setRef(c+i, 1); err != nil {
			return 0, err
		}
	}
	return c * w.q.csize, nil
}

// growTable moves the refcount table to a larger place (at least need
// entries); the old one is released after the next flush.
func (w *qwriter) growTable(need int64) error {
	q := w.q
	perCluster := q.csize / 8
	entries := max(need, int64(len(w.rt))*2)
	clusters := (entries + perCluster - 1) / perCluster
	if clusters*q.csize > maxRefTableBytes {
		return fmt.Errorf("%s: refcount table would exceed %d bytes", q.h.name, maxRefTableBytes)
	}
	start, err := w.findFree(clusters)
	if err != nil {
		return err
	}
	w.freeHint = start + clusters
	rt := make([]uint64, clusters*perCluster)
	copy(rt, w.rt)
	w.pending = append(w.pending, hostRange{w.rtOffset, w.rtClusters * q.csize})
	w.rt, w.rtOffset, w.rtClusters, w.rtDirty = rt, start*q.csize, clusters, true
	for i := int64(0); i < clusters; i++ {
		if err := w.setRef(start+i, 1); err != nil {
			return err
		}
	}
	return nil
}

// flush writes back the metadata in crash-safe order and makes everything
// written so far durable.
func (w *qwriter) flush() error {
	q := w.q
	f := q.h.f
	// 1. Data before anything that points at it.
	if err := f.Sync(); err != nil {
		return err
	}
	if len(w.rbDirty) == 0 && len(w.l2Dirty) == 0 && len(w.l1Dirty) == 0 && !w.rtDirty && len(w.pending) == 0 {
		return nil
	}
	// 2. Refcount increments (new blocks, a moved table, the header).
	if err := w.writeRefcounts(); err != nil {
		return err
	}
	// 3. L2 tables, then the L1 entries that point at new ones.
	for _, off := range sortedKeys(w.l2Dirty) {
		t := w.l2Dirty[off]
		if err := q.pwrite(t, off); err != nil {
			return err
		}
		q.l2.put(off, t)
		q.zeroL2.Delete(off)
	}
	if err := f.Sync(); err != nil {
		return err
	}
	var e [8]byte
	for _, i := range sortedKeys(w.l1Dirty) {
		binary.BigEndian.PutUint64(e[:], q.l1.get(i))
		if err := q.pwrite(e[:], int64(q.hdr.L1TableOffset)+i*8); err != nil {
			return err
		}
	}
	if err := f.Sync(); err != nil {
		return err
	}
	clear(w.l2Dirty)
	clear(w.l1Dirty)
	// 4. Release clusters nothing points at any more.
	if len(w.pending) > 0 {
		for _, r := range w.pending {
			for c := r.off >> q.cbits; c <= (r.off+r.length-1)>>q.cbits; c++ {
				v, err := w.getRef(c)
				if err != nil {
					return err
				}
				if v == 0 {
					return corrupt(q.h.name, c*q.csize, -1, "freeing cluster %#x whose refcount is already 0", c*q.csize)
				}
				if err := w.setRef(c, v-1); err != nil {
					return err
				}
				if v == 1 {
					w.freeHint = min(w.freeHint, c)
				}
			}
		}
		w.pending = nil
		if err := w.writeRefcounts(); err != nil {
			return err
		}
	}
	return nil
}

// writeRefcounts writes dirty refcount blocks, then the table and header
// if the table changed, and syncs.
func (w *qwriter) writeRefcounts() error {
	q := w.q
	for _, off := range sortedKeys(w.rbDirty) {
		if err := q.pwrite(w.rb[off], off); err != nil {
			return err
		}
	}
	clear(w.rbDirty)
	if w.rtDirty {
		buf := make([]byte, len(w.rt)*8)
		for i, v := range w.rt {
			binary.BigEndian.PutUint64(buf[i*8:], v)
		}
		if err := q.pwrite(buf, w.rtOffset); err != nil {
			return err
		}
		if err := q.h.f.Sync(); err != nil {
			return err
		}
		if int64(q.hdr.RefcountTableOffset) != w.rtOffset || int64(q.hdr.RefcountTableClusters) != w.rtClusters {
			var h [12]byte
			binary.BigEndian.PutUint64(h[0:], uint64(w.rtOffset))
			binary.BigEndian.PutUint32(h[8:], uint32(w.rtClusters))
			if err := q.pwrite(h[:], 48); err != nil {
				return err
			}
			q.hdr.RefcountTableOffset, q.hdr.RefcountTableClusters = uint64(w.rtOffset), uint32(w.rtClusters)
		}
		w.rtDirty = false
	}
	return q.h.f.Sync()
}

func sortedKeys[V any](m map[int64]V) []int64 {
	keys := make([]int64, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return keys[i] < keys[j] })
	return keys
}

// writeZeroes zeroes [off, off+length): whole clusters (subclusters with
// extended L2) through metadata, the rest by writing zeroes.
func (q *qcow2Layer) writeZeroes(img *Image, off, length int64, flags ZeroFlags) error {
	unit := int64(1) << q.scBits
	defer q.markDirty(off, length)
	lo := (off + unit - 1) &^ (unit - 1)
	hi := (off + length) &^ (unit - 1)
	if q.hdr.Version < 3 || lo >= hi {
		lo, hi = off, off // nothing through metadata
	}
	if flags&ZeroFast != 0 && (lo > off || hi < off+length) {
		return ErrNotFast
	}
	if err := q.zeroBytes(img, off, lo); err != nil {
		return err
	}
	for gc := lo &^ (q.csize - 1); lo < hi && gc < hi; gc += q.csize {
		a, b := max(lo, gc)-gc, min(hi, gc+q.csize)-gc
		if err := q.zeroCluster(img, gc, a, b, flags&ZeroMayUnmap != 0); err != nil {
			return err
		}
	}
	if err := q.zeroBytes(img, max(hi, off), off+length); err != nil {
		return err
	}
	return q.w.maybeFlush()
}

// zeroBytes writes zeroes over [from, to) where that is not already zero.
func (q *qcow2Layer) zeroBytes(img *Image, from, to int64) error {
	for from < to {
		n := min(to-from, 1<<20)
		zero := true
		m := merger{fn: func(e Extent) error {
			zero = zero && e.Zero
			return nil
		}}
		if err := img.walk(0, from, from+n, &m); err != nil {
			return err
		}
		if err := m.flush(); err != nil {
			return err
		}
		if !zero {
			if err := q.writeAt(img, make([]byte, n), from); err != nil {
				return err
			}
		}
		from += n
	}
	return nil
}

// zeroCluster zeroes bytes [a, b) of the cluster at gc, subcluster aligned.
func (q *qcow2Layer) zeroCluster(img *Image, gc, a, b int64, mayUnmap bool) error {
	e, bm, err := q.entryAt(gc)
	if err != nil {
		return err
	}
	host := int64(e & l2eOffsetMask)
	compressed := e&oflagCompressed != 0
	if !q.extL2 {
		switch {
		case !mayUnmap && !compressed && host != 0 && q.exclusive(host, q.csize):
			return q.setEntry(gc, uint64(host)|oflagCopied|oflagZero, 0) // keep it preallocated
		default:
			if err := q.setEntry(gc, oflagZero, 0); err != nil {
				return err
			}
			q.w.release(e, host)
			return nil
		}
	}
	whole := a == 0 && b == q.csize
	if compressed && !whole {
		// Subclusters of a compressed cluster cannot be zeroed through
		// the bitmap: materialize it first.
		if err := q.writeCluster(img, nil, gc); err != nil {
			return err
		}
		if e, bm, err = q.entryAt(gc); err != nil {
			return err
		}
		host, compressed = int64(e&l2eOffsetMask), false
	}
	if whole && (mayUnmap || host == 0 || compressed) {
		if err := q.setEntry(gc, 0, 0xffffffff<<32); err != nil {
			return err
		}
		q.w.release(e, host)
		return nil
	}
	for s := a >> q.scBits; s < b>>q.scBits; s++ {
		bm |= 1 << (32 + s)
		bm &^= 1 << s
	}
	ne := uint64(0)
	if host != 0 {
		ne = uint64(host) | oflagCopied
	}
	return q.setEntry(gc, ne, bm)
}

// discard releases whole clusters in [off, off+length). Like QEMU, the
// clusters then read as zeroes (v3: zero flag) so the backing file does not
// show through; partial clusters are left as they are.
func (q *qcow2Layer) discard(img *Image, off, length int64) error {
	q.markDirty(off, length)
	lo := (off + q.csize - 1) &^ (q.csize - 1)
	hi := (off + length) &^ (q.csize - 1)
	if off+length == img.Size() {
		hi = (off + length + q.csize - 1) &^ (q.csize - 1) // the partial last cluster
	}
	for gc := lo; gc < hi; gc += q.csize {
		e, bm, err := q.entryAt(gc)
		if err != nil {
			return err
		}
		host := int64(e & l2eOffsetMask)
		var ne, nbm uint64
		switch {
		case q.hdr.Version < 3:
			ne = 0
		case q.extL2:
			nbm = 0xffffffff << 32
		default:
			ne = oflagZero
		}
		if e == ne && bm == nbm {
			continue
		}
		if err := q.setEntry(gc, ne, nbm); err != nil {
			return err
		}
		q.w.release(e, host)
	}
	return q.w.maybeFlush()
}

func (q *qcow2Layer) flush() error { return q.w.flush() }

// finish stores persistent bitmaps and flushes, before the image closes.
func (q *qcow2Layer) finish() error {
	if err := q.w.flush(); err != nil {
		return err
	}
	return q.storeBitmaps()
}
