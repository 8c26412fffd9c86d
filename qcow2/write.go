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
	// attach gives the writer the layers below it, once, before any write.
	attach(b below)
	writeAt(p []byte, off int64) error
	writeZeroes(off, length int64, flags ZeroFlags) error
	discard(off, length int64) error
	flush() error
	// finish is the last flush, at Close (bitmaps are stored back).
	finish() error
}

// below is what a writer sees of the layers under the top one: copy-on-write
// reads their bytes and asks whether a range reads as zeroes there. Past
// their end (and with no backing file) the guest reads zeroes.
type below struct {
	read func(p []byte, off int64) error
	zero func(off, end int64) (bool, error)
}

// setWriter makes w the image's writer and hands it the layers below the
// top one.
func (img *Image) setWriter(w writer) {
	img.w = w
	w.attach(below{
		read: func(p []byte, off int64) error { return img.readBelow(0, p, off) },
		zero: func(off, end int64) (bool, error) {
			if len(img.layers) == 1 {
				return true, nil
			}
			end = min(end, img.layers[1].size())
			if off >= end {
				return true, nil
			}
			zero := true
			m := merger{fn: func(e Extent) error {
				zero = zero && e.Zero
				return nil
			}}
			if err := img.walk(1, off, end, &m); err != nil {
				return false, err
			}
			if err := m.flush(); err != nil {
				return false, err
			}
			return zero, nil
		},
	})
}

// Dirty metadata beyond this many L2 tables is flushed before more writes.
const maxDirtyL2 = 256

// qwriter is the write state of a qcow2 layer. All of it is guarded by the
// image's lock held exclusively (reads hold it shared and look at l2Dirty).
type qwriter struct {
	f       *wfile
	rc      *refcounts
	below   below
	l2Dirty map[int64][]byte // L2 tables changed since the last flush
	l1Dirty map[int64]bool   // L1 indexes changed since the last flush
}

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
	f := &wfile{h: q.h}
	rc, err := loadRefcounts(q.h.name, q.hdr, q.csize, q.cbits, refIO{
		read:    q.h.readFull,
		write:   q.pwrite,
		sync:    f.sync,
		fileLen: func() int64 { return q.fileLen },
	})
	if err != nil {
		return err
	}
	q.w = &qwriter{f: f, rc: rc, l2Dirty: map[int64][]byte{}, l1Dirty: map[int64]bool{}}
	if err := q.loadBitmapsForWriting(); err != nil {
		q.w = nil
		return err
	}
	return nil
}

func (q *qcow2Layer) attach(b below) { q.w.below = b }

func (q *qcow2Layer) writeAt(p []byte, off int64) error {
	if err := q.w.f.failed(); err != nil {
		return err
	}
	q.markDirty(off, int64(len(p)))
	for len(p) > 0 {
		m, err := q.lookup(off, int64(len(p)))
		if err != nil {
			return err
		}
		n := m.length
		switch {
		case m.typ == scNormal && q.w.rc.exclusive(m.host, n):
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
			if err := q.writeCluster(p[:n], off); err != nil {
				return err
			}
		}
		p, off = p[n:], off+n
	}
	return q.maybeFlush()
}

// pwrite writes to the qcow2 file (failing the image if that fails).
func (q *qcow2Layer) pwrite(p []byte, host int64) error {
	if err := q.w.f.pwrite(p, host); err != nil {
		return err
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
	host, err := q.w.rc.alloc(k)
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

// readChain reads guest bytes [off, off+len(p)) as the chain shows them:
// this layer, and the layers below where it has nothing.
func (q *qcow2Layer) readChain(p []byte, off int64) error {
	for len(p) > 0 {
		n, unalloc, err := q.read(p, off)
		if err != nil {
			return err
		}
		if n <= 0 {
			return fmt.Errorf("qcow2: internal error: no progress reading at %#x", off)
		}
		if unalloc {
			if err := q.w.below.read(p[:n], off); err != nil {
				return err
			}
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// readsZero reports whether guest bytes [off, end) read as zeroes through
// the chain.
func (q *qcow2Layer) readsZero(off, end int64) (bool, error) {
	for off < end {
		st, err := q.status(off, end-off)
		if err != nil {
			return false, err
		}
		n := st.length
		if n <= 0 || n > end-off {
			return false, fmt.Errorf("qcow2: internal error: status length %d at %#x", n, off)
		}
		zero := st.zero
		if !st.alloc {
			if zero, err = q.w.below.zero(off, off+n); err != nil {
				return false, err
			}
		}
		if !zero {
			return false, nil
		}
		off += n
	}
	return true, nil
}

// currentContent returns bytes [lo, hi) of the cluster at gc as the guest
// reads them now (zero beyond the image's end).
func (q *qcow2Layer) currentContent(gc, lo, hi int64) ([]byte, error) {
	buf := make([]byte, hi-lo)
	end := min(gc+hi, q.size())
	if gc+lo < end {
		if err := q.readChain(buf[:end-gc-lo], gc+lo); err != nil {
			return nil, err
		}
	}
	return buf, nil
}

// writeCluster writes p at off, inside one cluster, in every case that
// needs more than an overwrite: copy-on-write from the backing chain,
// replacing a compressed or shared cluster, filling a preallocated zero
// cluster, and extended L2 subclusters.
func (q *qcow2Layer) writeCluster(p []byte, off int64) error {
	gc := off &^ (q.csize - 1)
	e, bm, err := q.entryAt(gc)
	if err != nil {
		return err
	}
	host := int64(e & l2eOffsetMask)
	replace := e&oflagCompressed != 0 || (host != 0 && !q.w.rc.exclusive(host, q.csize))
	if !q.extL2 || replace {
		return q.writeWhole(p, off, e, bm, replace)
	}
	return q.writeSubclusters(p, off, host, bm)
}

// writeWhole gives the cluster holding [off, off+len(p)) new content as a
// whole: p over what the guest reads there now. A preallocated zero
// cluster keeps its host cluster (unless replace); everything else gets a
// new one and the old one is released.
func (q *qcow2Layer) writeWhole(p []byte, off int64, e, bm uint64, replace bool) error {
	gc := off &^ (q.csize - 1)
	inC := off - gc
	host := int64(e & l2eOffsetMask)
	typ, _ := q.rangeType(e, bm, int(inC>>q.scBits))
	newHost := host
	eof := (q.fileLen + q.csize - 1) &^ (q.csize - 1)
	if typ != scZeroAlloc || replace {
		var err error
		if newHost, err = q.w.rc.alloc(1); err != nil {
			return err
		}
	}
	// A cluster past the end of the file has never been written and reads
	// as zeroes: if the old content is zero too, only p needs writing
	// (QEMU avoids the copy-on-write the same way).
	zeroBase := typ == scZeroPlain
	if typ == scUnallocPlain {
		z, err := q.w.below.zero(gc, gc+q.csize)
		zeroBase = err == nil && z
	}
	var err error
	switch {
	case inC == 0 && int64(len(p)) == q.csize:
		err = q.pwrite(p, newHost)
	case zeroBase && newHost >= eof:
		err = q.pwrite(p, newHost+inC)
	default:
		var buf []byte
		if typ == scZeroAlloc || zeroBase {
			buf = make([]byte, q.csize)
		} else if buf, err = q.currentContent(gc, 0, q.csize); err != nil {
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
		q.releaseEntry(e, host)
	}
	return nil
}

// writeSubclusters writes the subclusters [off, off+len(p)) touches in a
// cluster with extended L2 entries (host 0: not allocated yet), copying
// the untouched parts of partly written ones from the current content.
func (q *qcow2Layer) writeSubclusters(p []byte, off, host int64, bm uint64) error {
	gc := off &^ (q.csize - 1)
	inC := off - gc
	scs := int64(1) << q.scBits
	lo := inC &^ (scs - 1)
	hi := (inC + int64(len(p)) + scs - 1) &^ (scs - 1)
	buf := p
	var err error
	if lo != inC || hi != inC+int64(len(p)) {
		if buf, err = q.currentContent(gc, lo, hi); err != nil {
			return err
		}
		copy(buf[inC-lo:], p)
	}
	if host == 0 {
		if host, err = q.w.rc.alloc(1); err != nil {
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

// releaseEntry defers freeing the host clusters an L2 entry no longer uses.
func (q *qcow2Layer) releaseEntry(e uint64, host int64) {
	w := q.w
	switch {
	case e&oflagCompressed != 0:
		coff := int64(e&l2eCompressedMask&q.coffMask) &^ 511
		nsect := int64((e&l2eCompressedMask)>>q.csizeShift&q.csizeMask) + 1
		w.rc.release(coff, nsect*512)
	case host != 0:
		w.rc.release(host, q.csize)
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
		if l2off, err = w.rc.alloc(1); err != nil {
			return err
		}
		t = make([]byte, q.csize)
		q.l1.set(l1i, uint64(l2off)|oflagCopied)
		w.l1Dirty[l1i] = true
	} else if t = w.l2Dirty[l2off]; t == nil {
		if !w.rc.exclusive(l2off, q.csize) {
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

func (q *qcow2Layer) maybeFlush() error {
	if len(q.w.l2Dirty) > maxDirtyL2 {
		return q.flush()
	}
	return nil
}

// flush writes back the metadata in crash-safe order and makes everything
// written so far durable.
//
// Every step runs only if the one before succeeded, and a failed write or
// fsync fails the image (see ErrFailed): a step that failed is never
// followed by one that points at what it should have made durable, and
// nothing is marked clean before the fsync that made it durable.
func (q *qcow2Layer) flush() error {
	w := q.w
	f := w.f
	// 1. Data before anything that points at it.
	if err := f.sync(); err != nil {
		return err
	}
	if !w.rc.isDirty() && len(w.l2Dirty) == 0 && len(w.l1Dirty) == 0 {
		return nil
	}
	// 2. Refcount increments (new blocks, a moved table, the header).
	if err := w.rc.write(); err != nil {
		return err
	}
	// 3. L2 tables, then the L1 entries that point at new ones.
	for _, off := range sortedKeys(w.l2Dirty) {
		if err := q.pwrite(w.l2Dirty[off], off); err != nil {
			return err
		}
	}
	if err := f.sync(); err != nil {
		return err
	}
	for off, t := range w.l2Dirty {
		q.l2.put(off, t)
		q.zeroL2.Delete(off)
	}
	clear(w.l2Dirty)
	var e [8]byte
	for _, i := range sortedKeys(w.l1Dirty) {
		binary.BigEndian.PutUint64(e[:], q.l1.get(i))
		if err := q.pwrite(e[:], int64(q.hdr.L1TableOffset)+i*8); err != nil {
			return err
		}
	}
	if err := f.sync(); err != nil {
		return err
	}
	clear(w.l1Dirty)
	// 4. Release clusters nothing points at any more.
	return w.rc.releasePending()
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
func (q *qcow2Layer) writeZeroes(off, length int64, flags ZeroFlags) error {
	if err := q.w.f.failed(); err != nil {
		return err
	}
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
	if err := q.zeroBytes(off, lo); err != nil {
		return err
	}
	for gc := lo &^ (q.csize - 1); lo < hi && gc < hi; gc += q.csize {
		a, b := max(lo, gc)-gc, min(hi, gc+q.csize)-gc
		if err := q.zeroCluster(gc, a, b, flags&ZeroMayUnmap != 0); err != nil {
			return err
		}
	}
	if err := q.zeroBytes(max(hi, off), off+length); err != nil {
		return err
	}
	return q.maybeFlush()
}

// zeroBytes writes zeroes over [from, to) where that is not already zero.
func (q *qcow2Layer) zeroBytes(from, to int64) error {
	for from < to {
		n := min(to-from, 1<<20)
		zero, err := q.readsZero(from, from+n)
		if err != nil {
			return err
		}
		if !zero {
			if err := q.writeAt(make([]byte, n), from); err != nil {
				return err
			}
		}
		from += n
	}
	return nil
}

// zeroCluster zeroes bytes [a, b) of the cluster at gc, subcluster aligned.
func (q *qcow2Layer) zeroCluster(gc, a, b int64, mayUnmap bool) error {
	e, bm, err := q.entryAt(gc)
	if err != nil {
		return err
	}
	host := int64(e & l2eOffsetMask)
	compressed := e&oflagCompressed != 0
	if !q.extL2 {
		switch {
		case !mayUnmap && !compressed && host != 0 && q.w.rc.exclusive(host, q.csize):
			return q.setEntry(gc, uint64(host)|oflagCopied|oflagZero, 0) // keep it preallocated
		default:
			if err := q.setEntry(gc, oflagZero, 0); err != nil {
				return err
			}
			q.releaseEntry(e, host)
			return nil
		}
	}
	whole := a == 0 && b == q.csize
	if compressed && !whole {
		// Subclusters of a compressed cluster cannot be zeroed through
		// the bitmap: materialize it first.
		if err := q.writeCluster(nil, gc); err != nil {
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
		q.releaseEntry(e, host)
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
func (q *qcow2Layer) discard(off, length int64) error {
	if err := q.w.f.failed(); err != nil {
		return err
	}
	q.markDirty(off, length)
	lo := (off + q.csize - 1) &^ (q.csize - 1)
	hi := (off + length) &^ (q.csize - 1)
	if off+length == q.size() {
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
		q.releaseEntry(e, host)
	}
	return q.maybeFlush()
}

// finish stores persistent bitmaps and flushes, before the image closes.
// On a failed image it writes nothing: the bitmaps stay marked in_use
// (inconsistent), as a crash would leave them.
func (q *qcow2Layer) finish() error {
	if err := q.flush(); err != nil {
		return err
	}
	return q.storeBitmaps()
}
