// Package fusefs exposes a qcow2 backing chain as a FUSE file system on
// github.com/hanwen/go-fuse/v2, talking to the engine (package qcow2)
// directly, never through NBD. The tree is:
//
//	disk                      the guest-visible image (read-only)
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
// The whole mount is read-only ("ro"): opening a file for writing fails
// with EROFS, and no file of the chain is ever opened for writing.
//
// # Maps
//
// Map files are generated on demand, never held whole: a map of millions
// of extents streams through a per-open-file cursor that resumes the
// metactx.Walk where the last read stopped. The files are direct-I/O
// (FOPEN_DIRECT_IO) and report a size of 0, as /proc files do: readers
// read until end of file. A read at a lower offset than the cursor's
// (a re-read from the start) restarts the walk from the beginning. The
// bytes are exactly what metactx.WriteMap, and so `nbdgw map --context`,
// writes.
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
// # Concurrency
//
// go-fuse serves requests on many goroutines at once, and the kernel sends
// several reads of one file in parallel (async read, readahead). Disk
// reads go to qcow2.Image.ReadAt, which is safe for concurrent use, with no
// lock of this package held. Each open map file has a cursor guarded by its
// own mutex, so concurrent reads of one open map file are serialised while
// different opens proceed in parallel. The allocated-bytes count behind
// st_blocks is computed once per file, on first stat, under a sync.Once.
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
