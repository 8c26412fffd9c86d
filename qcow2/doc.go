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
//
// # I/O errors
//
// Errors stick. Once a pwrite or an fsync of the written file fails (guest
// data, a refcount block or the refcount table, an L2 table, an L1 entry,
// the header, a bitmap), the image is failed: every later WriteAt,
// WriteZeroes, Discard and Flush (so every FUA write) fails with an error
// that wraps ErrFailed, syscall.EIO and the first failure itself (so
// errors.Is finds syscall.ENOSPC when the disk was full, and the message
// names the failed call). Reads go on. Only closing the image and opening
// it again clears the state; a full disk (ENOSPC) fails the image the same
// way, since the write that did not fit may have been half done.
//
// A flush never lies: after a failed fsync Linux may have marked the
// unwritten pages clean, so a later fsync that returns 0 proves nothing
// about them. QEMU's file-posix driver keeps the errno of
// a failed fdatasync for the same reason and fails every later flush with
// it (page_cache_inconsistent); the engine does the same and, unlike
// QEMU, also treats a failed pwrite as permanent, because the metadata in
// memory may already point at what it did not write.
//
// A flush writes in the order data, fsync, refcount increments (new blocks
// fsynced before the table that points at them), fsync, L2 tables, fsync,
// L1 entries, fsync, and only then the release of freed clusters. A failed
// step stops the flush: nothing after it is written, and nothing is marked
// clean in memory before the fsync that made it durable succeeded. What is
// on disk is then the last successful flush plus at worst leaked clusters
// (qemu-img check exits 0 or 3): every byte a successful Flush acknowledged
// reads back. Close of a failed image writes nothing more: persistent
// bitmaps stay marked in_use, as a crash would leave them. QEMU 10 takes
// such a bitmap as inconsistent: qemu-img check still exits 0 (and -r all
// leaves the bitmap as it is), qemu-nbd -B refuses to export it ("is
// inconsistent and cannot be used"), and 'qemu-img bitmap --remove' is
// the way out; the engine skips it likewise when writing.
//
// # Image locking
//
// Every file of the chain is locked with QEMU's protocol (block/file-posix.c,
// locking=auto), so that nbdgw and QEMU processes exclude each other exactly
// as two QEMU processes do. A permission is one of QEMU's BLK_PERM_* bits:
// 0 consistent read, 1 write, 2 write unchanged, 3 resize (QEMU 7.0 dropped
// graph-mod, bit 4, so QEMU 7.2 and 10.0 use the same bytes). For each bit
// i a shared (F_RDLCK) open-file-description lock (F_OFD_SETLK) is held on
// byte 100+i while the file holds the permission, and on byte 200+i while
// it does not share it. An open first takes its bytes, then tests with
// F_OFD_GETLK (an exclusive lock on one byte) that no other open file
// description holds 200+i for a permission it wants or 100+i for one it
// does not share, as raw_handle_perm_lock() does; on a conflict it drops
// its bytes and fails with a *LockError (errors.Is ErrLocked): one line
// naming the file, QEMU's wording (Failed to get "write" lock / Failed to
// get shared "write" lock, Is another process using the image [FILE]?)
// and the holder found in /proc/*/fdinfo when it can be seen.
//
// What each open takes, as measured from QEMU 10.0's qemu-nbd (writable,
// -r, -s), qemu-io and qemu-img with /proc/PID/fdinfo (lock_test.go
// compares every case with the running QEMU tool; where QEMU versions
// differ nbdgw follows 10.0, and 7.2's tools were not measured):
//
//	file                      holds                     does not share
//	qcow2 image, read-only    consistent read           write, resize
//	qcow2 image, Writable     consistent read, write,   write, resize
//	                          resize
//	raw image, read-only      consistent read           resize
//	raw image, Writable       consistent read, write    resize
//	qcow2 backing file        consistent read           write, resize
//	raw backing file          consistent read           (shares all)
//	external data file        consistent read           resize
//	any file, ForceShare      consistent read           (shares all)
//
// So a writable open keeps the write permission on the top file and
// refuses to start beside any other user but a force-share reader (qemu-img
// info, a qemu-nbd -r or another nbdgw all unshare write), and a read-only
// open is like qemu-nbd -r: no writer can start while it runs, and it cannot
// start while a writer runs. Snapshot opens the chain as backing files of
// the overlay (qemu-nbd -s). Locks live with the open file description:
// Close drops them, and so does the death of the process however it ends.
// Two opens of one file in one process are two users and conflict as they
// would in QEMU.
//
// Locks are taken as soon as a file's format is known and before anything
// is written: a writable qcow2 image is set up for writing (bitmaps marked
// in_use) only once every file of the chain is open and locked, so a
// refused open leaves every file byte-identical and unlocked.
//
// ForceShare (qemu-img -U, force-share=on) opens read-only, shares every
// permission and so ignores every lock but a user that does not share
// consistent reads (none of QEMU's tools, whose opens appear above); it
// warns that answers may be inconsistent, and is refused with Writable or
// Snapshot, as QEMU refuses force-share on a writable image.
//
// Differences from QEMU, where nbdgw has one policy for several QEMU tools:
// nbdgw info and map lock like the qemu-nbd -r row (qemu-img info takes no
// consistent-read byte; qemu-img map does not unshare resize on a raw
// image), and an external data file is only ever read. Where the kernel
// has no OFD locks (F_OFD_GETLK fails on /dev/null, QEMU's probe), files
// are not locked, as QEMU's locking=auto does, with a warning QEMU does not
// print; any other failure to lock fails the open, as in QEMU.
package qcow2
