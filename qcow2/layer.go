package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"
)

// L1/L2 entry bits (QEMU's qcow2.h).
const (
	l1eOffsetMask     = 0x00fffffffffffe00
	l2eOffsetMask     = 0x00fffffffffffe00
	reftOffsetMask    = 0xfffffffffffffe00
	oflagCopied       = 1 << 63
	oflagCompressed   = 1 << 62
	oflagZero         = 1 << 0
	l2eCompressedMask = 0x3fffffffffffffff
)

// Cache budgets per layer.
const (
	l2CacheBytes = 32 << 20
	zCacheBytes  = 8 << 20
)

// scType is QEMU's QCow2SubclusterType.
type scType uint8

const (
	scUnallocPlain scType = iota // no host cluster; defer to backing
	scUnallocAlloc               // host cluster allocated, subcluster not: defer to backing
	scZeroPlain                  // reads as zero, no host cluster
	scZeroAlloc                  // reads as zero, host cluster allocated
	scNormal                     // data at a host offset
	scCompressed                 // compressed cluster
	scInvalid
)

func (t scType) String() string {
	return [...]string{"unallocated", "unallocated (host cluster allocated)", "zero", "zero (host cluster allocated)", "normal", "compressed", "invalid"}[t]
}

// qcow2Layer is one qcow2 file of the chain.
type qcow2Layer struct {
	h                *hostFile // the qcow2 file
	data             *hostFile // the external data file, or h
	ra               *os.File  // h's file again, with readahead, for guest reads (nil: use h)
	dfd              int       // h's file again, O_DIRECT, for metadata reads (-1: use h)
	depth            int
	hdr              *Header
	warnf            func(string)
	size_            int64
	fileLen, dataLen int64

	cbits        uint  // cluster bits
	csize        int64 // cluster size
	esize        int64 // L2 entry size: 8, or 16 with extended L2
	l2Entries    int64 // entries per L2 table
	scBits       uint  // subcluster bits (= cbits without extended L2)
	scPerCluster int
	extL2        bool
	hasDataFile  bool

	csizeShift uint
	csizeMask  uint64
	coffMask   uint64

	l1 l1Table // changed only by writes, under the image's lock

	l2     *lru[int64]  // L2 tables by host offset
	zeroL2 sync.Map     // int64 -> true: L2 tables known to be all zero
	zc     *lru[uint64] // decompressed clusters by compressed offset

	preOnce sync.Once // guards pre
	pre     bool      // metadata preallocation detected (QEMU's heuristic)

	bms []*bitmap // all bitmaps of the extension, in directory order

	w *qwriter // write state, nil unless opened writable
}

// openLayer opens one file of the chain. format "" probes (qcow2 magic or
// raw). It returns the layer and the backing file name and format it
// names, if any.
func openLayer(name, format string, depth int, writable bool, role lockRole, warn func(string)) (layer, string, string, error) {
	return openChainFile(&opener{warn: warn}, name, "image "+SafeName(name), format, depth, writable, role)
}

// opener is what every file of one Open shares.
type opener struct {
	conf *confiner // nil without Options.Confine
	warn func(string)
}

// openChainFile opens one file of the chain; what says where its name
// came from (for confinement messages), role how it is locked.
func openChainFile(o *opener, name, what, format string, depth int, writable bool, role lockRole) (layer, string, string, error) {
	h, err := o.conf.open(name, what, writable)
	if err != nil {
		return nil, "", "", safePathError(err)
	}
	h.role = role
	l, backing, backingFmt, err := openLayerFile(o, h, format, depth, writable)
	if err != nil {
		h.close()
		return nil, "", "", err
	}
	return l, backing, backingFmt, nil
}

// adviseRandom turns the kernel's readahead off for h (POSIX_FADV_RANDOM,
// per open file description), the description a qcow2 layer writes
// through and reads metadata through where O_DIRECT is not available
// (readMeta): a table read then caches its own pages only, not the guest
// data clusters after it. Guest data is read through a second description
// with the normal readahead (openReadahead).
func adviseRandom(h *hostFile) {
	unix.Fadvise(int(h.f.Fd()), 0, 0, unix.FADV_RANDOM)
}

// openReadahead opens a second, read-only description of h's file for
// guest data reads (nil if it cannot: reads then use h). It takes no
// lock: image locks are OFD locks on h's own description, which closing
// this one does not release.
func openReadahead(h *hostFile) *os.File {
	fd, err := unix.Open("/proc/self/fd/"+strconv.Itoa(int(h.f.Fd())), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil
	}
	return os.NewFile(uintptr(fd), h.name)
}

// readGuest reads guest data (a data or compressed cluster) at host
// offset off of f: through the readahead description when f is the
// qcow2 file itself.
func (q *qcow2Layer) readGuest(f *hostFile, p []byte, off int64) error {
	if f == q.h && q.ra != nil {
		return (&hostFile{name: f.name, f: q.ra}).readFull(p, off)
	}
	return f.readFull(p, off)
}

// readMeta reads metadata (tables, bitmaps) at off: with O_DIRECT where
// the file system has it, so that opening an image and answering block
// status leave the page cache as they found it. The kernel writes back
// dirty pages of the range before a direct read, so writes made through
// h are seen.
func (q *qcow2Layer) readMeta(p []byte, off int64) error {
	if q.dfd >= 0 {
		if ok, err := readAtDirect(q.dfd, p, off); ok {
			return err
		}
	}
	return q.h.readFull(p, off)
}

// guestFile is the descriptor guest data of h is read through.
func (q *qcow2Layer) guestFile(h *hostFile) *os.File {
	if h == q.h && q.ra != nil {
		return q.ra
	}
	return h.f
}

func openLayerFile(o *opener, h *hostFile, format string, depth int, writable bool) (layer, string, string, error) {
	fileLen, err := h.length()
	if err != nil {
		return nil, "", "", err
	}
	probed := format == ""
	if probed {
		if format, _, err = probeFile(h, fileLen); err != nil {
			return nil, "", "", err
		}
	}
	// The image locks are taken once the format is known (only the
	// probe's bytes have been read) and before anything is written.
	if err := h.lock(lockFor(format, writable, h.role), o.warn); err != nil {
		return nil, "", "", err
	}
	switch format {
	case FormatRaw:
		if probed && writable {
			// QEMU's raw_open() warning, and the same restriction.
			o.warn(SafeName(h.name) + ": image format was not specified and probing guessed raw; writes that would make the first 512 bytes probe as another format are refused: use -f raw to remove the restriction")
		}
		r, err := openRaw(h, depth, writable, probed)
		return r, "", "", err
	case FormatQcow2:
		adviseRandom(h)
		first, err := readHeaderCluster(h, fileLen)
		if err != nil {
			return nil, "", "", err
		}
		// Writable: Open calls startWriting once every file of the
		// chain is open and locked.
		q, err := openQcow2(o, h, first, fileLen, depth)
		if err != nil {
			return nil, "", "", err
		}
		return q, q.hdr.BackingFile, q.hdr.BackingFormat, nil
	}
	return nil, "", "", unsupportedFormat(h.name, format, probed && depth == 1, !probed && depth == 1)
}

// readHeaderCluster reads what ParseHeader needs and nothing more: the
// first cluster (header, extensions, backing file name), or the whole file
// when it is shorter. The cluster size comes from the header itself; an
// out-of-range one reads the smallest cluster and ParseHeader refuses it.
func readHeaderCluster(h *hostFile, fileLen int64) ([]byte, error) {
	fd := openDirect(h)
	if fd >= 0 {
		defer unix.Close(fd)
	}
	read := func(p []byte) error {
		if fd >= 0 {
			if ok, err := readAtDirect(fd, p, 0); ok {
				return err
			}
		}
		return h.readFull(p, 0)
	}
	head := make([]byte, min(fileLen, v3HeaderLength))
	if err := read(head); err != nil {
		return nil, fmt.Errorf("%s: reading the header: %w", SafeName(h.name), err)
	}
	n := int64(1) << minClusterBits
	if len(head) >= 24 {
		if cb := binary.BigEndian.Uint32(head[20:]); cb >= minClusterBits && cb <= maxClusterBits {
			n = 1 << cb
		}
	}
	first := make([]byte, min(fileLen, n))
	if err := read(first); err != nil {
		return nil, fmt.Errorf("%s: reading the header: %w", SafeName(h.name), err)
	}
	return first, nil
}

func openQcow2(o *opener, h *hostFile, first []byte, fileLen int64, depth int) (*qcow2Layer, error) {
	hdr, err := ParseHeader(h.name, first, fileLen)
	if err != nil {
		return nil, err
	}
	warn := o.warn
	q := &qcow2Layer{
		h: h, data: h, dfd: -1, depth: depth, hdr: hdr, warnf: warn,
		size_:   int64(hdr.Size) &^ 511, // QEMU: total_sectors = size / 512
		fileLen: fileLen, dataLen: fileLen,
		cbits: uint(hdr.ClusterBits), csize: hdr.ClusterSize(),
		esize: 8, extL2: hdr.ExtendedL2(),
		hasDataFile: hdr.IncompatibleFeatures&IncompatDataFile != 0,
		l2:          newLRU[int64](l2CacheBytes),
		zc:          newLRU[uint64](zCacheBytes),
	}
	if q.extL2 {
		q.esize = 16
	}
	q.l2Entries = q.csize / q.esize
	q.scBits, q.scPerCluster = q.cbits, 1
	if q.extL2 {
		q.scBits, q.scPerCluster = q.cbits-5, 32
	}
	q.csizeShift = 62 - (q.cbits - 8)
	q.csizeMask = 1<<(q.cbits-8) - 1
	q.coffMask = 1<<q.csizeShift - 1

	if hdr.IncompatibleFeatures&IncompatDirty != 0 {
		warn(SafeName(h.name) + ": image is marked dirty (not closed cleanly); refcounts may be stale, reading anyway")
	}
	if hdr.IncompatibleFeatures&IncompatCorrupt != 0 {
		warn(SafeName(h.name) + ": image is marked corrupt; reading anyway, read-only")
	}
	if q.hasDataFile {
		if hdr.DataFile == "" {
			return nil, corrupt(h.name, -1, -1, "external data file feature set but no data file name")
		}
		d, err := openDataFile(o, h.name, hdr.DataFile, false)
		if errors.Is(err, ErrConfined) {
			return nil, err
		}
		if err != nil {
			return nil, fmt.Errorf("%s: opening external data file %q: %w", SafeName(h.name), hdr.DataFile, err)
		}
		q.data = d
		if err := d.lock(dataFileLock(h.role), o.warn); err != nil {
			d.close()
			return nil, err
		}
		if q.dataLen, err = d.length(); err != nil {
			d.close()
			return nil, err
		}
	}
	if q.data == h {
		q.ra = openReadahead(h)
	}
	q.dfd = openDirect(h)
	if err := q.loadL1(); err != nil {
		q.close()
		return nil, err
	}
	if err := q.loadBitmaps(); err != nil {
		q.close()
		return nil, err
	}
	return q, nil
}

// openDataFile opens an external data file. QEMU 7.2 opens the name as
// stored, relative to the process's working directory (not the image's
// directory, unlike backing files); we do the same, so the names printed
// agree, and fall back to the image's directory where QEMU would fail.
// With confinement the data file must resolve inside the directory too
// (Options.NoBacking does not hide it: it is part of the top layer).
func openDataFile(o *opener, image, name string, writable bool) (*hostFile, error) {
	what := whatName("data file name", name, image)
	d, err := o.conf.open(name, what, writable)
	if err == nil || filepath.IsAbs(name) || errors.Is(err, ErrConfined) {
		return d, safePathError(err)
	}
	if d, err2 := o.conf.open(combinePath(image, name), what, writable); err2 == nil || errors.Is(err2, ErrConfined) {
		return d, err2
	}
	return nil, safePathError(err)
}

// safePathError quotes the path of an *os.PathError that needs it (it
// may come from an image header), keeping what it wraps.
func safePathError(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		pe.Path = SafeName(pe.Path)
	}
	return err
}

func (q *qcow2Layer) size() int64 { return q.size_ }

func (q *qcow2Layer) close() error {
	err := q.h.close()
	if e := q.closeData(); err == nil {
		err = e
	}
	return err
}

func (q *qcow2Layer) hostFiles() []*hostFile {
	if q.data != q.h {
		return []*hostFile{q.h, q.data}
	}
	return []*hostFile{q.h}
}

// closeData closes an external data file and the readahead description
// (the caller closes q.h).
func (q *qcow2Layer) closeData() error {
	if q.ra != nil {
		q.ra.Close()
		q.ra = nil
	}
	if q.dfd >= 0 {
		unix.Close(q.dfd)
		q.dfd = -1
	}
	if q.data != q.h {
		return q.data.close()
	}
	return nil
}

// l2Table returns the L2 table at host offset off (validated by the caller).
func (q *qcow2Layer) l2Table(off int64) ([]byte, error) {
	if q.w != nil {
		if t, ok := q.w.l2Dirty[off]; ok {
			return t, nil
		}
	}
	if t, ok := q.l2.get(off); ok {
		return t, nil
	}
	t := make([]byte, q.csize)
	if err := q.readMeta(t, off); err != nil {
		return nil, fmt.Errorf("%s: reading L2 table at %#x: %w", q.h.name, off, err)
	}
	if zeroEntries(t) == int64(len(t)) {
		q.zeroL2.Store(off, true)
	}
	q.l2.put(off, t)
	return t, nil
}

// knownZeroTable reports an L2 table seen to be all zero (and not changed
// since): crafted images point millions of L1 entries at one.
func (q *qcow2Layer) knownZeroTable(off int64) bool {
	if q.w != nil && q.w.l2Dirty[off] != nil {
		return false
	}
	_, ok := q.zeroL2.Load(off)
	return ok
}

func (q *qcow2Layer) entry(t []byte, i int64) (e, bm uint64) {
	e = binary.BigEndian.Uint64(t[i*q.esize:])
	if q.extL2 {
		bm = binary.BigEndian.Uint64(t[i*q.esize+8:])
	}
	return e, bm
}

// subType is QEMU's qcow2_get_subcluster_type().
func (q *qcow2Layer) subType(e, bm uint64, sc int) scType {
	if e&oflagCompressed != 0 {
		return scCompressed
	}
	allocated := e&l2eOffsetMask != 0 || (q.hasDataFile && e&oflagCopied != 0)
	if !q.extL2 {
		switch {
		case e&oflagZero != 0 && e&l2eOffsetMask != 0:
			return scZeroAlloc
		case e&oflagZero != 0:
			return scZeroPlain
		case allocated:
			return scNormal
		}
		return scUnallocPlain
	}
	zero := bm&(1<<(32+sc)) != 0
	if allocated {
		switch {
		case (bm>>32)&bm&0xffffffff != 0:
			return scInvalid
		case zero:
			return scZeroAlloc
		case bm&(1<<sc) != 0:
			return scNormal
		}
		return scUnallocAlloc
	}
	switch {
	case bm&0xffffffff != 0:
		return scInvalid
	case zero:
		return scZeroPlain
	}
	return scUnallocPlain
}

// rangeType is QEMU's qcow2_get_subcluster_range_type(): the type of
// subcluster from and how many subclusters from there share it.
func (q *qcow2Layer) rangeType(e, bm uint64, from int) (scType, int) {
	t := q.subType(e, bm, from)
	if !q.extL2 || t == scCompressed || t == scInvalid {
		return t, q.scPerCluster - from
	}
	n := 1
	for sc := from + 1; sc < q.scPerCluster && q.subType(e, bm, sc) == t; sc++ {
		n++
	}
	return t, n
}

// mapping is one layer-local run: [off, off+length) all of type typ.
type mapping struct {
	typ    scType
	length int64
	host   int64  // host offset of off: scNormal, scZeroAlloc, scUnallocAlloc
	l2e    uint64 // scCompressed: the L2 entry
}

// lookup is QEMU's qcow2_get_host_offset() with
// count_contiguous_subclusters(): the longest run starting at off, within
// one L2 table, of one subcluster type (and, where there is a host
// offset, contiguous on the host). Unallocated L1 ranges are skipped
// wholesale. off < size, length > 0.
func (q *qcow2Layer) lookup(off, length int64) (mapping, error) {
	cover := q.csize * q.l2Entries // guest bytes per L2 table
	l1i := off / cover
	if q.l1.get(l1i)&l1eOffsetMask == 0 {
		// Skip every unallocated L1 entry at once (and everything past
		// the table).
		next := q.l1.nextAllocated(l1i)
		end := off + length
		if next < q.l1.len() {
			end = min(end, next*cover)
		}
		return mapping{typ: scUnallocPlain, length: end - off}, nil
	}
	l1At := int64(q.hdr.L1TableOffset) + l1i*8
	l2off := int64(q.l1.get(l1i) & l1eOffsetMask)
	if l2off%q.csize != 0 {
		return mapping{}, corrupt(q.h.name, l1At, l1i, "L2 table offset %#x unaligned", l2off)
	}
	if l2off > q.fileLen-q.csize && (q.w == nil || q.w.l2Dirty[l2off] == nil) {
		return mapping{}, corrupt(q.h.name, l1At, l1i, "L2 table offset %#x past the end of the file (%d bytes)", l2off, q.fileLen)
	}
	if q.knownZeroTable(l2off) {
		// An all-zero L2 table: unallocated to its end, in one step.
		return mapping{typ: scUnallocPlain, length: min((l1i+1)*cover, off+length) - off}, nil
	}
	t, err := q.l2Table(l2off)
	if err != nil {
		return mapping{}, err
	}
	l2i := (off >> q.cbits) & (q.l2Entries - 1)
	inC := off & (q.csize - 1)
	sc := int(inC >> q.scBits)
	e, bm := q.entry(t, l2i)
	entryAt := l2off + l2i*q.esize
	typ, n := q.rangeType(e, bm, sc)
	m := mapping{typ: typ}
	switch typ {
	case scInvalid:
		return m, corrupt(q.h.name, entryAt, l2i, "invalid subcluster allocation bitmap %#016x for L2 entry %#016x", bm, e)
	case scCompressed:
		if q.hasDataFile {
			return m, corrupt(q.h.name, entryAt, l2i, "compressed cluster in an image with an external data file")
		}
		m.l2e = e & l2eCompressedMask
		m.length = min(q.csize-inC, length)
		return m, nil
	case scNormal, scZeroAlloc, scUnallocAlloc:
		if err := q.checkHostCluster(e, typ, off&^(q.csize-1), entryAt, l2i); err != nil {
			return m, err
		}
		m.host = int64(e&l2eOffsetMask) + inC
	}
	// Extend over following clusters of the same table while the type
	// stays the same (and host clusters stay contiguous).
	checkHost := typ == scNormal || typ == scZeroAlloc || typ == scUnallocAlloc
	expect := e & l2eOffsetMask
	subs := sc + n // subclusters covered, counted from the first cluster's start
	limit := min(q.l2Entries-l2i, (inC+length+q.csize-1)>>q.cbits)
	for i := int64(1); i < limit && sc+n == q.scPerCluster; i++ {
		if typ == scUnallocPlain {
			// Fast path: an all-zero entry (and bitmap) is unallocated.
			z := zeroEntries(t[(l2i+i)*q.esize:(l2i+limit)*q.esize]) / q.esize
			if z > 0 {
				subs += int(z) * q.scPerCluster
				i += z - 1
				sc, n = 0, q.scPerCluster
				continue
			}
		}
		e2, bm2 := q.entry(t, l2i+i)
		t2, n2 := q.rangeType(e2, bm2, 0)
		if t2 != typ {
			break
		}
		if checkHost {
			expect += uint64(q.csize)
			if e2&l2eOffsetMask != expect || q.checkHostCluster(e2, t2, off&^(q.csize-1)+i*q.csize, 0, 0) != nil {
				break // a later lookup reports any error there
			}
		}
		sc, n = 0, n2
		subs += n2
	}
	m.length = min(int64(subs)<<q.scBits-inC, length)
	return m, nil
}

// zeroEntries counts the leading zero bytes of b, in whole 8-byte words.
func zeroEntries(b []byte) int64 {
	i := 0
	for ; i+32 <= len(b); i += 32 {
		le := binary.LittleEndian
		if le.Uint64(b[i:])|le.Uint64(b[i+8:])|le.Uint64(b[i+16:])|le.Uint64(b[i+24:]) != 0 {
			break
		}
	}
	for ; i+8 <= len(b) && binary.LittleEndian.Uint64(b[i:]) == 0; i += 8 {
	}
	return int64(i)
}

// checkHostCluster validates the host cluster of an allocated L2 entry.
func (q *qcow2Layer) checkHostCluster(e uint64, typ scType, guest, entryAt, idx int64) error {
	hc := int64(e & l2eOffsetMask)
	if hc%q.csize != 0 {
		return corrupt(q.h.name, entryAt, idx, "cluster offset %#x unaligned", hc)
	}
	if q.hasDataFile && hc != guest {
		return corrupt(q.h.name, entryAt, idx, "external data file cluster offset %#x does not match guest offset %#x", hc, guest)
	}
	if typ == scNormal && hc >= q.dataLen {
		return corrupt(q.h.name, entryAt, idx, "data cluster offset %#x past the end of %s (%d bytes)", hc, q.data.name, q.dataLen)
	}
	return nil
}

// status is qcow2_co_block_status() plus the generic block layer's view of
// one node (bdrv_co_block_status()).
func (q *qcow2Layer) status(off, length int64) (layerStatus, error) {
	m, err := q.lookup(off, length)
	if err != nil {
		return layerStatus{}, err
	}
	st := layerStatus{length: m.length}
	switch m.typ {
	case scNormal:
		st.alloc, st.data, st.hasOffset = true, true, true
	case scZeroAlloc:
		st.alloc, st.zero, st.hasOffset = true, true, true
	case scUnallocAlloc:
		st.hasOffset = true
	case scZeroPlain:
		st.alloc, st.zero = true, true
	case scCompressed:
		st.alloc, st.data, st.compressed = true, true, true
	}
	if st.hasOffset {
		st.offset, st.file = m.host, q.data.name
	}
	if st.data && st.hasOffset && q.metadataPreallocated() {
		// BDRV_BLOCK_RECURSE: ask the host file whether the clusters
		// the metadata references are really there.
		n, hostData := q.data.extent(m.host, m.length)
		st.length = n
		if !hostData {
			st.zero = true
		}
	}
	return st, nil
}

func (q *qcow2Layer) read(p []byte, off int64) (int, bool, error) {
	m, err := q.lookup(off, int64(len(p)))
	if err != nil {
		return 0, false, err
	}
	buf := p[:m.length]
	switch m.typ {
	case scUnallocPlain, scUnallocAlloc:
		return len(buf), true, nil
	case scZeroPlain, scZeroAlloc:
		clear(buf)
	case scNormal:
		if err := q.readGuest(q.data, buf, m.host); err != nil {
			return 0, false, fmt.Errorf("%s: reading data at %#x: %w", q.data.name, m.host, err)
		}
	case scCompressed:
		c, err := q.compressedCluster(m.l2e)
		if err != nil {
			return 0, false, err
		}
		copy(buf, c[off&(q.csize-1):])
	}
	return len(buf), false, nil
}

// compressedCluster returns the decompressed cluster of a compressed L2
// entry (QEMU's qcow2_parse_compressed_l2_entry() and
// qcow2_co_pread_compressed()).
func (q *qcow2Layer) compressedCluster(e uint64) ([]byte, error) {
	coff := int64(e & q.coffMask)
	if c, ok := q.zc.get(uint64(coff)); ok {
		return c, nil
	}
	nsect := int64((e>>q.csizeShift)&q.csizeMask) + 1
	clen := nsect*512 - coff&511 // at most twice the cluster size
	if coff >= q.fileLen || coff+clen > (q.fileLen+511)&^511 {
		return nil, corrupt(q.h.name, coff, -1, "compressed cluster (%d bytes at %#x) past the end of the file (%d bytes)", clen, coff, q.fileLen)
	}
	in := make([]byte, clen)
	if err := q.readGuest(q.h, in, coff); err != nil {
		return nil, err
	}
	out := make([]byte, q.csize)
	if err := decompress(q.hdr.Compression, in, out); err != nil {
		return nil, corrupt(q.h.name, coff, -1, "compressed cluster (%d bytes, %s): %v", clen, q.hdr.Compression, err)
	}
	q.zc.put(uint64(coff), out)
	return out, nil
}

// metadataPreallocated is QEMU's qcow2_detect_metadata_preallocation():
// true when clearly more clusters have a refcount than the file has
// allocated on the host. Errors count as "no", as in QEMU.
func (q *qcow2Layer) metadataPreallocated() bool {
	q.preOnce.Do(func() {
		fileLen, err := q.h.length()
		if err != nil {
			return
		}
		realClusters := q.h.allocated() / q.csize
		threshold := max(realClusters*10/9, realClusters+2)
		end := ((fileLen+511)&^511 + q.csize - 1) / q.csize
		count, err := q.countRefcounts(end, threshold)
		q.pre = err == nil && count >= threshold
	})
	return q.pre
}

// countRefcounts counts clusters below end with a nonzero refcount,
// stopping once limit is reached.
func (q *qcow2Layer) countRefcounts(end, limit int64) (int64, error) {
	order := q.hdr.RefcountOrder
	perBlock := q.csize * 8 >> order
	entries := int64(q.hdr.RefcountTableClusters) * q.csize / 8
	rt := make([]byte, entries*8) // bounded by ParseHeader
	if err := q.readMeta(rt, int64(q.hdr.RefcountTableOffset)); err != nil {
		return 0, err
	}
	block := make([]byte, q.csize)
	var count int64
	for b := int64(0); b < entries && b*perBlock < end && count < limit; b++ {
		off := int64(binary.BigEndian.Uint64(rt[b*8:]) & reftOffsetMask)
		if off == 0 {
			continue
		}
		if off%q.csize != 0 || off > q.fileLen-q.csize {
			return 0, corrupt(q.h.name, int64(q.hdr.RefcountTableOffset)+b*8, b, "refcount block offset %#x invalid", off)
		}
		if err := q.readMeta(block, off); err != nil {
			return 0, err
		}
		n := min(perBlock, end-b*perBlock)
		for i := int64(0); i < n; i++ {
			if refcountAt(block, i, order) != 0 {
				count++
			}
		}
	}
	return count, nil
}

// refcountAt reads entry i of a refcount block with 2^order-bit entries
// (sub-byte entries are packed least significant bits first, as in QEMU).
func refcountAt(b []byte, i int64, order uint32) uint64 {
	switch order {
	case 0, 1, 2:
		bits := int64(1) << order
		per := 8 / bits
		return uint64(b[i/per]>>((i%per)*bits)) & (1<<bits - 1)
	case 3:
		return uint64(b[i])
	case 4:
		return uint64(binary.BigEndian.Uint16(b[i*2:]))
	case 5:
		return uint64(binary.BigEndian.Uint32(b[i*4:]))
	}
	return binary.BigEndian.Uint64(b[i*8:])
}
