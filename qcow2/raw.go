package qcow2

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// rawLayer is a raw file: guest offset = host offset, every byte allocated.
type rawLayer struct {
	h     *hostFile
	depth int
	len   int64 // file length rounded up to 512, as QEMU's total_sectors
	// probed: the format was probed, not given; writes that would change
	// what the first 512 bytes probe as are refused (checkProbedWrite).
	probed bool
}

func openRaw(h *hostFile, depth int, writable, probed bool) (layer, error) {
	n, err := h.length()
	if err != nil {
		return nil, err
	}
	r := &rawLayer{h: h, depth: depth, len: (n + 511) &^ 511, probed: probed}
	if writable {
		return &rawWriter{rawLayer: r, f: &wfile{h: h}}, nil
	}
	return r, nil
}

func (r *rawLayer) size() int64 { return r.len }

// status is file-posix's raw_co_block_status() under the raw format driver:
// data extents are DATA, holes ZERO, both allocated, mapped in place.
func (r *rawLayer) status(off, length int64) (layerStatus, error) {
	n, data := r.h.extent(off, length)
	return layerStatus{length: n, alloc: true, data: data, zero: !data,
		hasOffset: true, offset: off, file: r.h.name}, nil
}

func (r *rawLayer) read(p []byte, off int64) (int, bool, error) {
	if err := r.h.readFull(p, off); err != nil {
		return 0, false, fmt.Errorf("reading %s at %#x: %w", r.h.name, off, err)
	}
	return len(p), false, nil
}

func (r *rawLayer) bitmaps() []BitmapInfo { return nil }

func (r *rawLayer) bitmapStatus(name string, off, length int64, fn func(int64, int64, bool) error) error {
	return fmt.Errorf("%w: %q", ErrNoBitmap, name)
}

func (r *rawLayer) close() error { return r.h.close() }

func (r *rawLayer) hostFiles() []*hostFile { return []*hostFile{r.h} }

// rawWriter is a raw layer opened for writing: plain writes, holes punched
// for discard and unmapping zero writes. A failed write or fsync fails the
// image, as for qcow2 (see ErrFailed).
type rawWriter struct {
	*rawLayer
	f *wfile
}

func (r *rawWriter) attach(below) {}

func (r *rawWriter) writeAt(p []byte, off int64) error {
	if err := r.checkProbedWrite(off, p, int64(len(p))); err != nil {
		return err
	}
	return r.f.pwrite(p, off)
}

func (r *rawWriter) writeZeroes(off, length int64, flags ZeroFlags) error {
	if err := r.f.failed(); err != nil {
		return err
	}
	if err := r.checkProbedWrite(off, nil, length); err != nil {
		return err
	}
	fd := int(r.h.f.Fd())
	mode := uint32(unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE)
	if flags&ZeroMayUnmap != 0 {
		mode = unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE
	}
	if err := unix.Fallocate(fd, mode, off, length); err == nil {
		return nil
	}
	if flags&ZeroFast != 0 {
		return ErrNotFast
	}
	for length > 0 { // the file system cannot: write zeroes
		n := min(length, 1<<20)
		if err := r.writeAt(make([]byte, n), off); err != nil {
			return err
		}
		off, length = off+n, length-n
	}
	return nil
}

func (r *rawWriter) discard(off, length int64) error {
	if err := r.f.failed(); err != nil {
		return err
	}
	// Advisory: a file system without hole punching keeps the data, and
	// so does a probed image whose first 512 bytes would change format.
	if r.checkProbedWrite(off, nil, length) != nil {
		return nil
	}
	unix.Fallocate(int(r.h.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	return nil
}

func (r *rawWriter) flush() error { return r.f.sync() }

func (r *rawWriter) finish() error { return r.flush() }
