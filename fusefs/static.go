package fusefs

import (
	"context"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// bytesNode is a small read-only file whose content is fixed at mount
// time (info.json).
type bytesNode struct {
	fs.Inode
	data []byte
	tree *tree
}

var (
	_ = (fs.NodeOpener)((*bytesNode)(nil))
	_ = (fs.NodeReader)((*bytesNode)(nil))
	_ = (fs.NodeGetattrer)((*bytesNode)(nil))
	_ = (fs.NodeSetattrer)((*bytesNode)(nil))
)

func (n *bytesNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if errno := readOnlyOpen(flags); errno != 0 {
		return nil, 0, errno
	}
	return nil, fuse.FOPEN_KEEP_CACHE, 0
}

func (n *bytesNode) Read(ctx context.Context, f fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if off < 0 {
		return nil, syscall.EINVAL
	}
	if off >= int64(len(n.data)) {
		return fuse.ReadResultData(nil), 0
	}
	return fuse.ReadResultData(n.data[off:min(int64(len(n.data)), off+int64(len(dest)))]), 0
}

func (n *bytesNode) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	n.tree.fileAttr(&out.Attr, 0o444, uint64(len(n.data)))
	out.Blocks = (uint64(len(n.data)) + 511) / 512
	return 0
}

func (n *bytesNode) Setattr(ctx context.Context, f fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	return syscall.EROFS
}
