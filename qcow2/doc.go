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
// # Formats and confinement
//
// Without Options.Format the engine probes each file as QEMU 10.0's
// bdrv_probe_all() does: the first 512 bytes (BLOCK_PROBE_BUF_SIZE,
// zero-padded past the end of the file; an empty file is raw) are scored by
// every driver's probe function (ProbeFormat): qcow2 and qcow (the same
// magic, version >= 2 or 1), vmdk (sparse magics, or a text descriptor
// whose first line that is not a comment or blank is version=1..3), vpc
// ("conectix" at the start: a fixed VHD has its footer only at the end and
// probes as raw, in QEMU too), vhdx, vdi, qed, luks, parallels, bochs,
// cloop and dmg (by the file name suffix ".dmg" alone, score 2); raw scores
// 1 and wins when nothing else matches. A format other than qcow2 and raw
// is refused with one line naming it ("x.vmdk: image format vmdk is not
// supported (nbdgw reads qcow2 and raw); use -f raw to read the file as
// raw"), never served as raw bytes. Options.Format ("raw" or "qcow2")
// forces the opened image's format, as qemu-img -f does; any other name is
// refused before anything is opened. A backing file's format is the one
// its overlay's header records, or probed when it records none.
//
// A raw image whose format was probed and that is opened writable gets
// QEMU's restriction (block/raw-format.c: bs->probed): a warning at open,
// and any write, write-zeroes or discard touching the first 512 bytes is
// checked by probing those bytes as they would be after it; if they would
// probe as another format the write fails with ErrReadOnly (NBD_EPERM, as
// QEMU's -EPERM) and discards are skipped. Otherwise a guest could write a
// qcow2 header naming /etc/shadow as its backing file into its own disk,
// and the next probing open would read that file. QEMU checks only
// writes; zeroing can complete a magic too, so the engine checks all three.
//
// What is read at open is metadata only: the probe buffer, the qcow2
// header cluster (its size from the header: header, extensions and backing
// file name live there; not a fixed 2 MiB), the L1 table, the bitmap
// directory and tables; block status adds L2 tables and, once, the
// refcounts (QEMU's metadata-preallocation test). All of it is read with
// O_DIRECT where the file system has it (through a second descriptor of
// the same open file; tmpfs falls back to the page cache with readahead
// off), so opening an image and answering block status leave the page
// cache as they found it. This matters because a page cached over an ext4
// unwritten extent makes SEEK_DATA report data where it reported a hole:
// for raw files, and for qcow2 images QEMU judges metadata-preallocated,
// QEMU asks SEEK_DATA, so cached pages (the old 2 MiB read, or readahead
// past an L2 table into the data cluster after it) change the answer QEMU
// gives for the same file afterwards; and qemu-img's own readahead depends
// on which pages are cached, so "no page changed" is the only safe state
// to leave. Guest data is read through another descriptor with the normal
// readahead, for sequential speed.
//
// Options.Confine is the mode for images you do not trust. Every file of
// the chain (the image, each backing file and the external data file,
// which Options.NoBacking does not hide: it is part of the top layer) must
// resolve, after every symlink, inside Options.ConfineDir (default: the
// directory of the opened image) and be a regular file. The check is made
// on the file actually opened: the name is opened with O_PATH (no device
// is woken, no FIFO blocks), readlink of /proc/self/fd/N says where it
// leads and fstat what it is, and only then is the file opened for I/O
// through /proc/self/fd/N, which reopens that inode without resolving the
// name again; swapping a symlink between the check and the open changes
// nothing. A refusal names the file and the header field that named it:
//
//	backing file name "../../etc/passwd" (header of top.qcow2) resolves
//	to /etc/passwd, outside the confinement directory /tmp/x
//
// and wraps ErrConfined. Without Options.Confine names are followed as
// QEMU follows them.
//
// Options.Writable with Options.NoBacking on an image that has a backing
// file is refused by Open before anything is locked or written (only the
// header is peeked at): a write to part of a cluster copies the rest from
// below, which with the backing file hidden would be zeroes, hiding the
// backing file's data for good.
//
// Names read from images (backing and data file names, bitmap names,
// feature names, backing formats) are printed quoted (%q, strconv.Quote)
// in every message; file paths, which may end in such a name, are printed
// as they are when every byte is printable and quoted otherwise (SafeName),
// so that ESC, BEL, CR or LF from an image cannot forge lines or rewrite
// the terminal. qemu-img prints the "File" column of its human map raw; the
// engine's users print SafeName there, which differs from qemu-img only for
// such names.
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
