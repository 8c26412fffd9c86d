package fusefs

import (
	"context"
	"errors"
	"io"
	"sync"
	"syscall"

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

// diskNode is a read-only window [base, base+size) of an image: the whole
// guest disk, one layer alone, or one partition.
type diskNode struct {
	fs.Inode
	img        *qcow2.Image
	base, size int64
	tree       *tree

	blocksOnce sync.Once
	blocks     uint64 // 512-byte units of allocated data; set by blocksOnce
}

var (
	_ = (fs.NodeOpener)((*diskNode)(nil))
	_ = (fs.NodeReader)((*diskNode)(nil))
	_ = (fs.NodeGetattrer)((*diskNode)(nil))
	_ = (fs.NodeSetattrer)((*diskNode)(nil))
	_ = (fs.NodeLseeker)((*diskNode)(nil))
)

func newDiskNode(t *tree, img *qcow2.Image, base, size int64) *diskNode {
	return &diskNode{img: img, base: base, size: size, tree: t}
}

// Open refuses writing: the image is read-only. Reads may be cached across
// opens because the content never changes.
func (n *diskNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if errno := readOnlyOpen(flags); errno != 0 {
		return nil, 0, errno
	}
	return nil, fuse.FOPEN_KEEP_CACHE, 0
}

// readOnlyOpen is the check every file of the tree makes on open.
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
	n.blocksOnce.Do(func() {
		var err error
		if n.blocks, err = n.allocatedBlocks(); err != nil {
			// Failing stat would hide the whole file (lookups need
			// attributes) when only some metadata is bad: report it
			// fully allocated instead, and let reads fail where
			// they must.
			n.tree.logf("block status of [%d, +%d): %v; reporting it fully allocated", n.base, n.size, err)
			n.blocks = uint64((n.size + 511) / 512)
		}
	})
	n.tree.fileAttr(&out.Attr, 0o444, uint64(n.size))
	out.Blocks = n.blocks
	return 0
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

func (n *diskNode) Setattr(ctx context.Context, f fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	return syscall.EROFS
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
