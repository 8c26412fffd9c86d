// Package qcow2 is nbdgw's chain engine: it opens a qcow2 (v2 or v3) or raw
// image, follows its backing chain, reads guest data and answers the one
// question every front end asks: what is at this range?
//
// The package knows nothing of NBD or FUSE. Front ends call Open, then
// ReadAt, BlockStatus and BitmapStatus on the returned *Image.
//
// # Block status
//
// BlockStatus reports Extents. Each Extent carries every view QEMU has of a
// range, so that each front end can project the one it needs:
//
//   - Data, Zero: BDRV_BLOCK_DATA / BDRV_BLOCK_ZERO as
//     bdrv_block_status_above() reports them for the whole chain
//     (NBD base:allocation: HOLE = !Data, ZERO = Zero).
//   - Depth: bdrv_is_allocated_above(), the layer that supplies the bytes:
//     1 = the opened image, 2 = its backing file, ..., 0 = no layer.
//     (NBD qemu:allocation-depth.)
//   - MapDepth, Present, Offset, HasOffset, File: what qemu-img map
//     --output=json prints.
//
// QEMU's views disagree in two places and each is reproduced in its own
// field: past the end of a backing file shorter than the image above it,
// qemu-img map stops at the layer above (MapDepth = that layer, Present
// false) while allocation depth names the short layer itself (its
// zeroes "are allocated" there); and where no layer allocates a range,
// qemu-img map reports the bottom layer's depth while allocation depth is 0.
//
// # Host file allocation
//
// Like QEMU, the engine asks the host file system (SEEK_DATA/SEEK_HOLE) for
// raw layers, and for qcow2 layers it judges metadata-preallocated (more
// clusters referenced by refcounts than the file really has allocated):
// data clusters whose host bytes are a hole then read as, and are
// reported as, zero.
//
// # Concurrency
//
// An *Image is safe for concurrent use by many goroutines: ReadAt,
// BlockStatus and BitmapStatus may run in parallel. Caches are internal and
// bounded.
//
// # Error handling
//
// Errors found in an image carry the file, the offset and the table index
// that went wrong (*FormatError); callers test them with errors.Is against
// the sentinels ErrNotQcow2, ErrUnsupported, ErrCorrupt and ErrBackingChain.
// No length read from disk is trusted: every table size is bounded before
// anything is allocated, and every offset is checked against the file.
package qcow2
