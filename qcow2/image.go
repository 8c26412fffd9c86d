package qcow2

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
)

// MaxChainDepth bounds the backing chain. QEMU has no fixed limit but
// refuses loops; a chain deeper than this is refused as absurd.
const MaxChainDepth = 64

// Options control Open.
type Options struct {
	// NoBacking opens the top layer alone, as QEMU does with
	// "backing": null: unallocated ranges read as zeroes.
	NoBacking bool
	// Format forces the top layer's format ("qcow2" or "raw"); "" probes
	// as QEMU does and refuses formats the engine does not read, naming
	// them (see the package documentation, "Formats and confinement").
	Format string
	// Warn receives warnings (dirty or corrupt bits on a read-only open,
	// inconsistent bitmaps). Nil writes them to standard error.
	Warn func(msg string)
	// Writable opens the top layer for writing. Backing files are always
	// opened read-only. Without it, no file of the chain is opened for
	// writing and every write method returns ErrReadOnly.
	Writable bool
	// Snapshot puts a temporary qcow2 overlay on top of the chain and
	// opens only the overlay for writing: the chain on disk stays
	// byte-identical. The overlay is unlinked as soon as it is open.
	Snapshot bool
	// ForceShare opens read-only without taking or honouring other
	// processes' image locks (QEMU's force-share=on, qemu-img -U).
	ForceShare bool
	// Confine requires every file of the chain (backing and external
	// data files included) to resolve, after symlinks, inside ConfineDir
	// (default: the opened image's directory) and to be a regular file.
	Confine    bool
	ConfineDir string
	// TolerateMissingBacking stops the chain at a backing file that does
	// not exist instead of failing, and records it (ChainInfo's
	// MissingBacking), as qemu-img info shows an image whose backing file
	// is gone. Refused with Writable and Snapshot: reads of such an image
	// would be wrong where the backing file should answer.
	TolerateMissingBacking bool

	// snapshotBase: the chain is opened under a snapshot overlay, so
	// its top file is locked as a backing file (create.go).
	snapshotBase bool
}

// Image is an opened backing chain. Layer 0 of layers is the opened image.
type Image struct {
	// mu guards the metadata of the top layer: reads and block status
	// hold it shared, writes and flushes exclusively. Views made by Layer
	// share it.
	mu     *sync.RWMutex
	layers []layer
	w      writer // nil unless opened writable
	warn   func(string)
	// missingBacking: the backing file of the last layer, which does not
	// exist (Options.TolerateMissingBacking).
	missingBacking string
}

// Extent is the engine's answer for one guest range. See the package
// documentation for the meaning of each field.
type Extent struct {
	Start, Length int64

	Data bool // BDRV_BLOCK_DATA for the whole chain
	Zero bool // BDRV_BLOCK_ZERO for the whole chain

	// Depth is the allocation depth: 1 = the opened image, 2 = its backing
	// file, ...; 0 = no layer allocates the range.
	Depth int

	// What qemu-img map --output=json prints.
	MapDepth int  // "depth"
	Present  bool // "present"
	// "compressed" (QEMU 10.0's qemu-img map; BDRV_BLOCK_COMPRESSED):
	// the range is a compressed cluster of the layer that allocates it.
	Compressed bool
	HasOffset  bool   // "offset" is printed
	Offset     int64  // "offset": host offset of Start in File
	File       string // the file Offset refers to
}

// layer is one file of the chain: a qcow2 image or a raw file.
type layer interface {
	info() LayerInfo
	// size is the guest-visible length, as QEMU's bdrv_getlength reports
	// it (raw files are rounded up to 512 bytes).
	size() int64
	// status answers for a prefix of [off, off+length), off < size().
	status(off, length int64) (layerStatus, error)
	// read fills a prefix of p from guest offset off (off < size(),
	// off+len(p) <= size()). When the prefix is unallocated in this
	// layer, it is left untouched and unalloc is true: the caller reads
	// it from the backing file.
	read(p []byte, off int64) (n int, unalloc bool, err error)
	bitmaps() []BitmapInfo
	bitmapStatus(name string, off, length int64, fn func(start, length int64, dirty bool) error) error
	hostFiles() []*hostFile
	close() error
}

// layerStatus is one layer's answer for a range, QEMU's
// bdrv_co_block_status() of that node.
type layerStatus struct {
	length     int64
	alloc      bool // BDRV_BLOCK_ALLOCATED: this layer supplies the bytes
	data       bool
	zero       bool
	hasOffset  bool
	offset     int64
	file       string
	compressed bool
}

// Open opens the image at path and its backing chain.
func Open(path string, opts Options) (*Image, error) {
	if err := checkForceShare(path, opts); err != nil {
		return nil, err
	}
	if err := checkFormatName(path, opts.Format, true); err != nil {
		return nil, err
	}
	o := &opener{warn: opts.Warn}
	if o.warn == nil {
		o.warn = func(msg string) { fmt.Fprintln(os.Stderr, "nbdgw: warning: "+msg) }
	}
	if opts.Confine {
		c, err := newConfiner(path, opts.ConfineDir)
		if err != nil {
			return nil, err
		}
		o.conf = c
	}
	if opts.Writable && opts.NoBacking {
		if err := refuseWritableNoBacking(o, path, opts.Format); err != nil {
			return nil, err
		}
	}
	if opts.TolerateMissingBacking && (opts.Writable || opts.Snapshot) {
		return nil, fmt.Errorf("qcow2: internal error: TolerateMissingBacking with a writable or snapshot open of %s", SafeName(path))
	}
	if opts.Snapshot {
		return openSnapshot(path, opts)
	}
	img := &Image{mu: new(sync.RWMutex), warn: o.warn}
	if opts.ForceShare {
		img.warn(SafeName(path) + ": opened with force-share: other processes' image locks are ignored, and answers may be inconsistent if another process writes the image")
	}
	seen := map[string]bool{}
	name, format, what := path, opts.Format, "image "+SafeName(path)
	for depth := 1; ; depth++ {
		if depth > MaxChainDepth {
			img.Close()
			return nil, &FormatError{File: name, Offset: -1, Index: -1, Msg: fmt.Sprintf("backing chain deeper than %d layers", MaxChainDepth), Err: ErrBackingChain}
		}
		key := name
		if fi, err := os.Stat(name); err == nil {
			key = fileKey(fi, name)
		}
		if seen[key] {
			img.Close()
			return nil, &FormatError{File: name, Offset: -1, Index: -1, Msg: "backing chain loops back to this file", Err: ErrBackingChain}
		}
		seen[key] = true
		if depth > 1 && opts.TolerateMissingBacking {
			if _, err := os.Lstat(name); errors.Is(err, os.ErrNotExist) {
				img.missingBacking = name
				break
			}
		}
		l, backing, backingFmt, err := openChainFile(o, name, what, format, depth, opts.Writable && depth == 1, chainRole(opts, depth))
		if err != nil {
			if depth > 1 && !errors.Is(err, ErrConfined) {
				err = fmt.Errorf("opening backing file %s (depth %d) of %s: %w", SafeName(name), depth, SafeName(img.layers[len(img.layers)-1].info().Filename), err)
			}
			img.Close()
			return nil, err
		}
		img.layers = append(img.layers, l)
		if backing == "" || opts.NoBacking {
			break
		}
		if strings.HasPrefix(backing, "json:") || strings.Contains(backing, "://") {
			img.Close()
			return nil, unsupported(name, "backing file %q is not a local file name", backing)
		}
		what = whatName("backing file name", backing, name)
		name, format = combinePath(name, backing), backingFmt
	}
	if opts.Writable {
		// Only now, with every file of the chain open and locked, may
		// anything be written (bitmaps are marked in_use).
		if err := img.startWriting(); err != nil {
			img.Close()
			return nil, err
		}
	}
	return img, nil
}

// startWriting sets up writes to the top layer.
func (img *Image) startWriting() error {
	w, ok := img.layers[0].(writer)
	if !ok {
		return fmt.Errorf("qcow2: internal error: %s was not opened for writing", img.layers[0].info().Filename)
	}
	if q, ok := w.(*qcow2Layer); ok {
		if err := q.startWriting(); err != nil {
			return err
		}
	}
	img.setWriter(w)
	return nil
}

// combinePath resolves a backing or data file name the way QEMU's
// path_combine() does: relative names are taken relative to the directory
// of the image that names them, keeping the overlay's own spelling.
func combinePath(base, name string) string {
	if filepath.IsAbs(name) {
		return name
	}
	i := strings.LastIndexByte(base, '/')
	if i < 0 {
		return name
	}
	return base[:i+1] + name
}

// Close flushes a writable image and closes every file of the chain.
func (img *Image) Close() error {
	var first error
	if img.w != nil {
		img.mu.Lock()
		first = img.w.finish()
		img.mu.Unlock()
		img.w = nil
	}
	for _, l := range img.layers {
		if err := l.close(); err != nil && first == nil {
			first = err
		}
	}
	img.layers = nil
	return first
}

// Size is the guest-visible size in bytes.
func (img *Image) Size() int64 { return img.layers[0].size() }

// Layers describes each layer, top first.
func (img *Image) Layers() []LayerInfo {
	out := make([]LayerInfo, len(img.layers))
	for i, l := range img.layers {
		out[i] = l.info()
	}
	return out
}

// Layer returns a view of layer depth (1 = the opened image) opened alone,
// as if with Options.NoBacking. It shares files with img and must not be
// used after img is closed; closing it is a no-op.
func (img *Image) Layer(depth int) (*Image, error) {
	if depth < 1 || depth > len(img.layers) {
		return nil, fmt.Errorf("no layer %d: the chain has %d", depth, len(img.layers))
	}
	return &Image{mu: img.mu, layers: []layer{noClose{img.layers[depth-1]}}, warn: img.warn}, nil
}

type noClose struct{ layer }

func (noClose) close() error { return nil }

// ReadAt reads guest data. Ranges past the end of the image are an error
// (io.EOF after a short read), like os.File.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, errors.New("qcow2: negative offset")
	}
	size := img.Size()
	if off >= size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	want := p
	if int64(len(p)) > size-off {
		want = p[:size-off]
	}
	img.mu.RLock()
	defer img.mu.RUnlock()
	if err := img.readLayer(0, want, off); err != nil {
		return 0, err
	}
	if len(want) < len(p) {
		return len(want), io.EOF
	}
	return len(p), nil
}

// readLayer reads p at off from layer i, deferring unallocated parts to the
// layers below. Past the end of a short backing file the guest reads zeroes.
func (img *Image) readLayer(i int, p []byte, off int64) error {
	l := img.layers[i]
	for len(p) > 0 {
		n, unalloc, err := l.read(p, off)
		if err != nil {
			return err
		}
		if n <= 0 {
			return fmt.Errorf("qcow2: internal error: layer %d made no progress at %#x", i+1, off)
		}
		if unalloc {
			if err := img.readBelow(i, p[:n], off); err != nil {
				return err
			}
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

func (img *Image) readBelow(i int, p []byte, off int64) error {
	if i+1 >= len(img.layers) {
		clear(p)
		return nil
	}
	bsize := img.layers[i+1].size()
	in := p
	if off >= bsize {
		in = nil
	} else if int64(len(p)) > bsize-off {
		in = p[:bsize-off]
	}
	clear(p[len(in):])
	if len(in) == 0 {
		return nil
	}
	return img.readLayer(i+1, in, off)
}

// BlockStatus calls fn with the extents of [off, off+length), clipped to
// the image, in order, each maximal: adjacent extents differ in some field
// (or their offsets are not contiguous). If fn returns an error the walk
// stops and BlockStatus returns that error. fn runs with the image's lock
// held shared: it must not call back into the image.
func (img *Image) BlockStatus(off, length int64, fn func(Extent) error) error {
	_, err := img.BlockStatusBudget(off, length, 0, fn)
	return err
}

// errBudget stops a walk that used up its budget.
var errBudget = errors.New("qcow2: block status budget used up")

// BlockStatusBudget is BlockStatus bounded in work: it stops after steps
// lookups in the layers (0: no bound) and returns the offset it reached,
// having reported everything before it. However many lookups a crafted
// image needs per extent (millions of L1 entries pointing at empty L2
// tables, say), one call then costs a bounded time.
func (img *Image) BlockStatusBudget(off, length int64, steps int, fn func(Extent) error) (int64, error) {
	if off < 0 || length < 0 {
		return off, errors.New("qcow2: negative offset or length")
	}
	end := off + length
	if end > img.Size() || end < off {
		end = img.Size()
	}
	if off >= end {
		return off, nil
	}
	m := merger{fn: fn, budget: steps, reached: off}
	img.mu.RLock()
	defer img.mu.RUnlock()
	if err := img.walk(0, off, end, &m); err != nil && err != errBudget {
		return m.reached, err
	}
	return m.reached, m.flush()
}

// walk is bdrv_co_common_block_status_above() and qemu-img's
// get_block_status() at once: layer i answers for [off, end); ranges it
// does not allocate are asked of the layer below.
func (img *Image) walk(i int, off, end int64, m *merger) error {
	l := img.layers[i]
	for off < end {
		if m.budget > 0 {
			if m.steps >= m.budget {
				return errBudget
			}
			m.steps++
		}
		st, err := l.status(off, end-off)
		if err != nil {
			return err
		}
		n := st.length
		if n <= 0 || n > end-off {
			return fmt.Errorf("qcow2: internal error: layer %d status length %d at %#x", i+1, n, off)
		}
		switch {
		case st.alloc:
			err = m.add(Extent{Start: off, Length: n, Data: st.data, Zero: st.zero,
				Depth: i + 1, MapDepth: i, Present: true, Compressed: st.compressed,
				HasOffset: st.hasOffset, Offset: st.offset, File: st.file})
		case i+1 == len(img.layers):
			// No backing file: the block layer reads zeroes, allocated
			// nowhere; qemu-img map stops at this layer.
			err = m.add(unallocExtent(off, n, st, 0, i))
		default:
			bsize := img.layers[i+1].size()
			mid := min(max(off, bsize), off+n)
			if off < mid {
				err = img.walk(i+1, off, mid, m)
			}
			if err == nil && mid < off+n {
				// Past the end of the backing file: zeroes that QEMU's
				// allocation depth attributes to the short layer, while
				// qemu-img map stops at this one.
				skip := mid - off
				if st.hasOffset {
					st.offset += skip
				}
				err = m.add(unallocExtent(mid, n-skip, st, i+2, i))
			}
		}
		if err != nil {
			return err
		}
		off += n
	}
	return nil
}

func unallocExtent(off, n int64, st layerStatus, depth, mapDepth int) Extent {
	e := Extent{Start: off, Length: n, Zero: true, Depth: depth, MapDepth: mapDepth}
	if st.hasOffset {
		e.HasOffset, e.Offset, e.File = true, st.offset, st.file
	}
	return e
}

// merger joins adjacent extents that agree in every field.
type merger struct {
	fn      func(Extent) error
	cur     Extent
	has     bool
	budget  int   // lookups allowed (0: no bound)
	steps   int   // lookups made
	reached int64 // end of the last extent added
}

func (m *merger) add(e Extent) error {
	m.reached = e.Start + e.Length
	if m.has {
		c := &m.cur
		if c.Start+c.Length == e.Start && c.Data == e.Data && c.Zero == e.Zero &&
			c.Depth == e.Depth && c.MapDepth == e.MapDepth && c.Present == e.Present &&
			c.Compressed == e.Compressed &&
			c.HasOffset == e.HasOffset && c.File == e.File &&
			(!c.HasOffset || c.Offset+c.Length == e.Offset) {
			c.Length += e.Length
			return nil
		}
		if err := m.fn(m.cur); err != nil {
			m.has = false
			return err
		}
	}
	m.cur, m.has = e, true
	return nil
}

func (m *merger) flush() error {
	if !m.has {
		return nil
	}
	m.has = false
	return m.fn(m.cur)
}

// Bitmaps lists the persistent dirty bitmaps the chain offers: those of
// the opened image, then those of backing layers whose names are not
// already taken (QEMU's qemu-nbd --bitmap looks down the chain the same
// way).
func (img *Image) Bitmaps() []BitmapInfo {
	var out []BitmapInfo
	seen := map[string]bool{}
	for _, l := range img.layers {
		for _, b := range l.bitmaps() {
			if !seen[b.Name] {
				seen[b.Name] = true
				out = append(out, b)
			}
		}
	}
	return out
}

// BitmapStatus calls fn with maximal runs of [off, off+length), clipped to
// the image, that are dirty or clean in the persistent bitmap name.
func (img *Image) BitmapStatus(name string, off, length int64, fn func(start, length int64, dirty bool) error) error {
	if off < 0 || length < 0 {
		return errors.New("qcow2: negative offset or length")
	}
	end := off + length
	if end > img.Size() || end < off {
		end = img.Size()
	}
	img.mu.RLock()
	defer img.mu.RUnlock()
	for _, l := range img.layers {
		for _, b := range l.bitmaps() {
			if b.Name == name {
				if off >= end {
					return nil
				}
				return l.bitmapStatus(name, off, end-off, fn)
			}
		}
	}
	return fmt.Errorf("%w: %q", ErrNoBitmap, name)
}

// Writable reports whether the image was opened for writing.
func (img *Image) Writable() bool { return img.w != nil }

func (img *Image) checkWrite(off, length int64) error {
	if img.w == nil {
		return ErrReadOnly
	}
	if off < 0 || length < 0 || off+length > img.Size() || off+length < off {
		return fmt.Errorf("qcow2: write of %d bytes at %d outside the image (%d bytes)", length, off, img.Size())
	}
	return nil
}

// WriteAt writes guest data to the top layer (copy-on-write from the
// backing chain where the top layer has no cluster yet).
func (img *Image) WriteAt(p []byte, off int64) (int, error) {
	if err := img.checkWrite(off, int64(len(p))); err != nil {
		return 0, err
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	if err := img.w.writeAt(p, off); err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteZeroes makes [off, off+length) read as zeroes.
func (img *Image) WriteZeroes(off, length int64, flags ZeroFlags) error {
	if err := img.checkWrite(off, length); err != nil {
		return err
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	return img.w.writeZeroes(off, length, flags)
}

// Discard tells the image [off, off+length) is no longer needed. Whole
// clusters are released and read as zeroes afterwards.
func (img *Image) Discard(off, length int64) error {
	if err := img.checkWrite(off, length); err != nil {
		return err
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	return img.w.discard(off, length)
}

// Flush makes every write completed so far durable.
func (img *Image) Flush() error {
	if img.w == nil {
		return nil
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	return img.w.flush()
}

// HostFile returns the engine's own open handle on the chain file named
// name (as Extent.File names it), or nil. It is for zero-copy reads of
// ranges block status mapped to that file on a read-only image: callers
// use it only with positioned reads (pread, sendfile with an offset) and
// never close it.
func (img *Image) HostFile(name string) *os.File {
	if img.w != nil {
		return nil // mappings change under writes
	}
	for _, l := range img.layers {
		for _, h := range l.hostFiles() {
			if h.name == name {
				if nc, ok := l.(noClose); ok {
					l = nc.layer
				}
				if q, ok := l.(*qcow2Layer); ok {
					return q.guestFile(h) // readahead on, unlike metadata reads
				}
				return h.f
			}
		}
	}
	return nil
}
