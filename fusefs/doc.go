// Package fusefs exposes a qcow2 backing chain as a FUSE file system on
// github.com/hanwen/go-fuse/v2, talking to the engine (package qcow2)
// directly, never through NBD. The tree is:
//
//	disk                      the guest-visible image (writable if the image is)
//	info.json                 what `nbdgw info --output=json` prints
//	maps/base-allocation      nbdinfo --map text of base:allocation
//	maps/allocation-depth     ... of qemu:allocation-depth
//	maps/joint-allocation     ... of qemu:joint-allocation
//	maps/dirty-bitmap-NAME    ... of each persistent bitmap
//	maps/*.json               the same maps in nbdinfo --map --json form
//	layers/N/disk             what layer N (1 = the opened image) holds alone
//	layers/N/maps/...         the maps of layer N alone
//	partitions/pN             partition N of the MBR or GPT of disk
//
// The disk files (disk, layers/N/disk, partitions/pN) answer reads straight
// from qcow2.Image.ReadAt, SEEK_DATA and SEEK_HOLE from block status (the
// base:allocation HOLE bit) and report st_blocks from the allocated bytes.
// Unless the image was opened writable the whole mount is read-only ("ro"):
// opening a file for writing fails with EROFS, and no file of the chain is
// ever opened for writing (the engine opens none).
//
// # Writes
//
// When the image was opened writable (qcow2.Options.Writable), disk (mode
// 0644) takes writes; everything else stays read-only (EROFS): layers/N,
// maps/, info.json, and the partitions. Writes go to the top layer only.
//
//   - write(2) is qcow2.Image.WriteAt. The size is fixed, and disk behaves
//     like a block device at its end: a write starting at or past the end
//     fails with ENOSPC, one crossing it is cut short. `dd conv=notrunc`
//     works; dd without conv=notrunc, `cp` onto disk and `>` redirection
//     open with O_TRUNC and fail with EPERM before anything is written.
//   - truncate/ftruncate to the current size succeeds (a no-op); any other
//     size, and chmod/chown/utimes, fail with EPERM.
//   - fsync, fdatasync and the FLUSH of every close of a descriptor opened
//     for writing are qcow2.Image.Flush: data, then the metadata that points
//     at it, is durable when they return. sync(1) and syncfs(2) do not
//     reach a FUSE server: fsync or close. (A fork of a process holding
//     disk open for writing flushes too, when the child closes its copy
//     of the descriptor, at exec or exit.) SIGINT/SIGTERM/SIGHUP flush the
//     image at once, even when the mount is busy and cannot be unmounted
//     yet; when the mount goes (signal or `fusermount3 -u`) the image is
//     closed, and so flushed, before nbdgw exits.
//   - fallocate: PUNCH_HOLE|KEEP_SIZE is WriteZeroes with ZeroMayUnmap (whole
//     clusters deallocated, or zero-flagged where a backing file would show
//     through; edges written with zeroes), so the range reads as zeroes
//     and maps show it as a hole; ZERO_RANGE is WriteZeroes without unmap;
//     mode 0 and KEEP_SIZE alone succeed without doing anything (the disk
//     is fully sized already); a mode-0 or ZERO_RANGE range past the end is
//     EFBIG (it would grow the file); collapse/insert/unshare are EOPNOTSUPP.
//   - Errors: ENOSPC, EDQUOT and EFBIG from the host file system pass through;
//     every other engine error is logged and is EIO.
//
// Maps are generated per open, so a map file opened after a write shows
// it; info.json and the partition list are fixed at mount.
//
// # Maps
//
// Map files are generated on demand, never held whole: a map of millions
// of extents streams through a per-open-file metactx.Map that resumes
// the metactx.Walk where the last read stopped. The files are direct-I/O
// (FOPEN_DIRECT_IO) and report a size of 0, as /proc files do: readers
// read until end of file. A read at a lower offset than the cursor's
// (a re-read from the start) restarts the walk from the beginning. The
// bytes are exactly what `nbdgw map --context` writes: metactx.Map is
// the one writer of both.
//
// # Caching
//
// Nothing in a read-only mount ever changes, so entries and attributes are
// cached for an hour and disk files are opened with FOPEN_KEEP_CACHE: a
// second `cat disk` is served from the page cache. Requests are up to
// 1 MiB (max_read); when run as root the mount's readahead is raised from
// the kernel's 128 KiB to 1 MiB through sysfs, so sequential reads arrive
// as 1 MiB requests served in parallel (up to 64 in flight). Map files are
// never cached.
//
// In a writable mount the kernel's writeback cache stays off (go-fuse does
// not ask for it): every write(2) is a synchronous WRITE request, and the
// kernel updates disk's page cache with the data it wrote. Since disk's
// content changes only through disk itself, its cache stays coherent and
// disk keeps FOPEN_KEEP_CACHE (O_DIRECT writes invalidate the cached
// pages; the kernel drops the cached range of a punch-hole or zero-range
// fallocate). The files that show the same bytes through another inode
// (layers/1/disk and partitions/pN) are opened with FOPEN_DIRECT_IO instead,
// so they never serve pages cached before a write to disk. Attributes are
// cached for one second only, as st_blocks changes with writes (it is
// recomputed, by a block-status walk, at most once a second: the kernel
// asks for attributes before every read that follows a write); disk's
// mtime stays the image's mtime at mount (a changing mtime would make the
// kernel drop the page cache at every stat).
//
// # Concurrency
//
// go-fuse serves requests on many goroutines at once, and the kernel sends
// several reads of one file in parallel (async read, readahead). Disk
// reads go to qcow2.Image.ReadAt, which is safe for concurrent use, with no
// lock of this package held. Each open map file has a cursor guarded by its
// own mutex, so concurrent reads of one open map file are serialised while
// different opens proceed in parallel. The allocated-bytes count behind
// st_blocks is computed on first stat (and again after writes, at most
// once a second) under a per-file mutex. Writes, zeroing and flushes go
// to the engine, which serialises them against each other and against
// reads of the metadata (qcow2.Image's lock); the kernel mostly sends
// writes of one file one at a time anyway (write(2) holds the inode lock
// without writeback caching or parallel direct writes).
//
// # Deadlocks
//
// The server never calls back into the kernel (no notify calls), so no
// request waits on another. The one deadlock to know about is outside the
// package: a process must not loop-mount (or otherwise do blocking file
// I/O on) a file of a FUSE mount it serves itself from the goroutines that
// serve it — run `mount -o ro,loop MOUNT/partitions/p1` from another
// process, as `nbdgw mount` users naturally do.
//
// # Error handling
//
// Engine errors on read, seek or map generation are logged through
// Config.Logf and returned to the caller as EIO. Stat never fails: a disk
// file whose block status cannot be computed is reported fully allocated
// (and the error logged), because a failing stat would hide the file and
// with it the ranges that still read fine. A partition table that cannot
// be read leaves partitions/ empty.
package fusefs
