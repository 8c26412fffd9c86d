package qcow2

import "fmt"

// rawLayer is a raw file: guest offset = host offset, every byte allocated.
type rawLayer struct {
	h     *hostFile
	depth int
	len   int64 // file length rounded up to 512, as QEMU's total_sectors
}

func openRaw(h *hostFile, depth int) (*rawLayer, error) {
	n, err := h.length()
	if err != nil {
		return nil, err
	}
	return &rawLayer{h: h, depth: depth, len: (n + 511) &^ 511}, nil
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

func (r *rawLayer) info() LayerInfo {
	return LayerInfo{Depth: r.depth, Filename: r.h.name, Format: "raw", VirtualSize: r.len, ActualSize: r.h.allocated()}
}

func (r *rawLayer) bitmaps() []BitmapInfo { return nil }

func (r *rawLayer) bitmapStatus(name string, off, length int64, fn func(int64, int64, bool) error) error {
	return fmt.Errorf("%w: %q", ErrNoBitmap, name)
}

func (r *rawLayer) close() error { return r.h.close() }
