package fusefs

import (
	"context"
	"errors"
	"io"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/nbdgw/nbdgw/qcow2"
)

// Whence values the kernel forwards to FUSE_LSEEK (SEEK_SET, SEEK_CUR and
// SEEK_END it answers itself).
const (
	seekData = 3
	seekHole = 4
)

// diskNode is a window [base, base+size) of an image: the whole guest
// disk, one layer alone, or one partition. Only the top-level disk of a
// writable image accepts writes (writable); windows whose content changes
// through that disk (layers/1/disk and the partitions, when the image is
// writable) are volatile: they bypass the page cache.
type diskNode struct {
	fs.Inode
	img        *qcow2.Image
	base, size int64
	tree       *tree
	writable   bool
	volatile   bool

	blocksMu  sync.Mutex
	blocksGen uint64    // tree.gen when blocks was computed, plus one (0: never)
	blocksAt  time.Time // when blocks was computed
	blocks    uint64    // 512-byte units of allocated data
}

// blocksMaxAge bounds how long st_blocks may lag writes.
const blocksMaxAge = time.Second

var (
	_ = (fs.NodeOpener)((*diskNode)(nil))
	_ = (fs.NodeReader)((*diskNode)(nil))
	_ = (fs.NodeWriter)((*diskNode)(nil))
	_ = (fs.NodeWritever)((*diskNode)(nil))
	_ = (fs.NodeFlusher)((*diskNode)(nil))
	_ = (fs.NodeFsyncer)((*diskNode)(nil))
	_ = (fs.NodeAllocater)((*diskNode)(nil))
	_ = (fs.NodeGetattrer)((*diskNode)(nil))
	_ = (fs.NodeSetattrer)((*diskNode)(nil))
	_ = (fs.NodeLseeker)((*diskNode)(nil))
)

func newDiskNode(t *tree, img *qcow2.Image, base, size int64) *diskNode {
	return &diskNode{img: img, base: base, size: size, tree: t}
}

// writeHandle marks a disk opened for writing: its FLUSH (every close)
// flushes the image.
type writeHandle struct{}

// Open refuses writing unless the node is writable. Reads may be cached
// across opens unless the node is volatile: the writable disk's own writes
// go through its page cache, so that cache stays coherent with the image.
func (n *diskNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if !n.writable {
		if errno := readOnlyOpen(flags); errno != 0 {
			return nil, 0, errno
		}
		if n.volatile {
			return nil, fuse.FOPEN_DIRECT_IO, 0
		}
		return nil, fuse.FOPEN_KEEP_CACHE, 0
	}
	if flags&syscall.O_TRUNC != 0 {
		// The size is fixed; the kernel normally turns O_TRUNC into
		// a SETATTR, refused the same way.
		return nil, 0, syscall.EPERM
	}
	if flags&syscall.O_ACCMODE == syscall.O_RDONLY {
		return nil, fuse.FOPEN_KEEP_CACHE, 0
	}
	return &writeHandle{}, fuse.FOPEN_KEEP_CACHE, 0
}

// readOnlyOpen is the check every read-only file of the tree makes on
// open.
func readOnlyOpen(flags uint32) syscall.Errno {
	if flags&syscall.O_ACCMODE != syscall.O_RDONLY || flags&syscall.O_TRUNC != 0 {
		return syscall.EROFS
	}
	return 0
}

func (n *diskNode) Read(ctx context.Context, f fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if off < 0 {
		return nil, syscall.EINVAL
	}
	if off >= n.size {
		return fuse.ReadResultData(nil), 0
	}
	if int64(len(dest)) > n.size-off {
		dest = dest[:n.size-off]
	}
	k, err := n.img.ReadAt(dest, n.base+off)
	if err != nil && !(errors.Is(err, io.EOF) && k == len(dest)) {
		n.tree.logf("read of %d bytes at %d: %v", len(dest), n.base+off, err)
		return nil, syscall.EIO
	}
	return fuse.ReadResultData(dest[:k]), 0
}

func (n *diskNode) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	perm := uint32(0o444)
	if n.writable {
		perm = 0o644
	}
	n.tree.fileAttr(&out.Attr, perm, uint64(n.size))
	out.Blocks = n.allocated()
	return 0
}

// allocated is st_blocks. It walks the block status of the whole window,
// so after writes it is recomputed at most once per blocksMaxAge: the
// kernel asks for attributes before every read that follows a write
// (auto_inval_data), and a walk per read would make reads of a large
// image crawl. st_blocks may thus lag writes by up to blocksMaxAge, as
// it may on a local file system with delayed allocation.
func (n *diskNode) allocated() uint64 {
	n.blocksMu.Lock()
	defer n.blocksMu.Unlock()
	gen := n.tree.gen.Load() + 1
	if n.blocksGen == gen || n.blocksGen != 0 && time.Since(n.blocksAt) < blocksMaxAge {
		return n.blocks
	}
	var err error
	if n.blocks, err = n.allocatedBlocks(); err != nil {
		// Failing stat would hide the whole file (lookups need
		// attributes) when only some metadata is bad: report it
		// fully allocated instead, and let reads fail where they
		// must.
		n.tree.logf("block status of [%d, +%d): %v; reporting it fully allocated", n.base, n.size, err)
		n.blocks = uint64((n.size + 511) / 512)
	}
	n.blocksGen, n.blocksAt = gen, time.Now()
	return n.blocks
}

// allocatedBlocks counts the bytes that block status reports as data (the
// base:allocation HOLE bit clear), in 512-byte units as st_blocks wants.
func (n *diskNode) allocatedBlocks() (uint64, error) {
	var data int64
	err := n.img.BlockStatus(n.base, n.size, func(e qcow2.Extent) error {
		if e.Data {
			data += e.Length
		}
		return nil
	})
	return uint64((data + 511) / 512), err
}

// Setattr: the disk size is fixed. Setting it to what it is succeeds (cp
// and others ftruncate to the final size); any other size is EPERM, as is
// every other change (mode, owner, times). Read-only files say EROFS.
func (n *diskNode) Setattr(ctx context.Context, f fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if !n.writable {
		return syscall.EROFS
	}
	const ignored = fuse.FATTR_FH | fuse.FATTR_LOCKOWNER
	if in.Valid&^ignored != fuse.FATTR_SIZE || in.Size != uint64(n.size) {
		return syscall.EPERM
	}
	return n.Getattr(ctx, f, out)
}

// Write writes through to the image. The disk has a fixed size and
// behaves like a block device at its end: a write that starts at or past
// the end fails with ENOSPC, one that crosses it is cut short (so `dd`
// writes what fits and then reports "No space left on device").
func (n *diskNode) Write(ctx context.Context, f fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	return n.Writev(ctx, f, [][]byte{data}, off)
}

func (n *diskNode) Writev(ctx context.Context, f fs.FileHandle, data [][]byte, off int64) (uint32, syscall.Errno) {
	if !n.writable {
		return 0, syscall.EROFS
	}
	if off < 0 {
		return 0, syscall.EINVAL
	}
	var done int64
	for _, p := range data {
		if len(p) == 0 {
			continue
		}
		at := off + done
		if at >= n.size {
			if done > 0 {
				break
			}
			return 0, syscall.ENOSPC
		}
		if int64(len(p)) > n.size-at {
			p = p[:n.size-at]
		}
		_, err := n.img.WriteAt(p, n.base+at)
		n.tree.changed()
		if err != nil {
			return uint32(done), n.tree.writeErrno(err, "write of %d bytes at %d", len(p), n.base+at)
		}
		done += int64(len(p))
	}
	return uint32(done), 0
}

// writeErrno logs a write-side engine error and turns it into an errno:
// a full or over-quota host file system is reported as such (also by every
// later call on an image that failed for it: the engine's failure wraps
// its first cause), everything else is EIO. Every one is logged, since the
// errno alone does not say which file and call failed first.
func (t *tree) writeErrno(err error, format string, args ...any) syscall.Errno {
	t.logf(format+": %v", append(args, err)...)
	for _, e := range []syscall.Errno{syscall.ENOSPC, syscall.EDQUOT, syscall.EFBIG} {
		if errors.Is(err, e) {
			return e
		}
	}
	return syscall.EIO
}

// Flush is sent at every close of a file descriptor: closing a disk that
// was opened for writing makes its writes durable, as fsync does.
func (n *diskNode) Flush(ctx context.Context, f fs.FileHandle) syscall.Errno {
	if _, ok := f.(*writeHandle); !ok || !n.writable {
		return 0
	}
	return n.flush()
}

// Fsync (and fdatasync) flush the image: data, then the metadata that
// points at it.
func (n *diskNode) Fsync(ctx context.Context, f fs.FileHandle, flags uint32) syscall.Errno {
	if !n.writable {
		return 0
	}
	return n.flush()
}

func (n *diskNode) flush() syscall.Errno {
	if err := n.img.Flush(); err != nil {
		return n.tree.writeErrno(err, "flush")
	}
	return 0
}

// fallocate(2) modes the kernel forwards.
const (
	fallocKeepSize  = 0x01
	fallocPunchHole = 0x02
	fallocZeroRange = 0x10
)

// Allocate implements fallocate(2) on the fixed-size disk:
//   - mode 0 and KEEP_SIZE: every byte of the disk is already backed as far
//     as the file is concerned; success within the size, and a range
//     beyond the end fails with EFBIG unless KEEP_SIZE says to keep the size.
//   - PUNCH_HOLE|KEEP_SIZE: the range reads as zeroes afterwards; whole
//     clusters are deallocated (zero flag where a backing file shows
//     through), the edges are written with zeroes.
//   - ZERO_RANGE: the range reads as zeroes; clusters are not deallocated
//     (zero flag or written zeroes).
//
// The part of a KEEP_SIZE range past the end is ignored, as on any file.
// Other modes (collapse, insert, unshare) are EOPNOTSUPP.
func (n *diskNode) Allocate(ctx context.Context, f fs.FileHandle, off, length uint64, mode uint32) syscall.Errno {
	if !n.writable {
		return syscall.EROFS
	}
	if mode&^(fallocKeepSize|fallocPunchHole|fallocZeroRange) != 0 ||
		mode&fallocPunchHole != 0 && (mode&fallocKeepSize == 0 || mode&fallocZeroRange != 0) {
		return syscall.EOPNOTSUPP
	}
	size := uint64(n.size)
	end := off + length
	if end < off || length == 0 {
		return syscall.EINVAL
	}
	if end > size && mode&fallocKeepSize == 0 {
		return syscall.EFBIG
	}
	end = min(end, size)
	if mode&(fallocPunchHole|fallocZeroRange) == 0 || off >= end {
		return 0
	}
	var flags qcow2.ZeroFlags
	if mode&fallocPunchHole != 0 {
		flags = qcow2.ZeroMayUnmap
	}
	err := n.img.WriteZeroes(n.base+int64(off), int64(end-off), flags)
	n.tree.changed()
	if err != nil {
		return n.tree.writeErrno(err, "zeroing %d bytes at %d", end-off, n.base+int64(off))
	}
	return 0
}

// errFound stops a block-status walk at the extent looked for.
var errFound = errors.New("found")

// Lseek answers SEEK_DATA and SEEK_HOLE from block status. As on a local
// file system, an offset at or past the end is ENXIO for both, SEEK_DATA
// with no data after off is ENXIO, and SEEK_HOLE finds the implicit hole
// at the end of the file. This is what keeps `cp --sparse` from looping.
func (n *diskNode) Lseek(ctx context.Context, f fs.FileHandle, off uint64, whence uint32) (uint64, syscall.Errno) {
	if whence != seekData && whence != seekHole {
		return 0, syscall.EINVAL
	}
	if off >= uint64(n.size) {
		return 0, syscall.ENXIO
	}
	wantData := whence == seekData
	found := int64(-1)
	err := n.img.BlockStatus(n.base+int64(off), n.size-int64(off), func(e qcow2.Extent) error {
		if e.Data == wantData {
			found = max(e.Start-n.base, int64(off))
			return errFound
		}
		return nil
	})
	if err != nil && err != errFound {
		n.tree.logf("block status at %d: %v", n.base+int64(off), err)
		return 0, syscall.EIO
	}
	switch {
	case found >= 0:
		return uint64(found), 0
	case wantData:
		return 0, syscall.ENXIO
	default:
		return uint64(n.size), 0
	}
}
