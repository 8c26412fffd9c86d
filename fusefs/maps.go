package fusefs

import (
	"context"
	"strings"
	"sync"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/nbdgw/nbdgw/internal/metactx"
	"github.com/nbdgw/nbdgw/qcow2"
)

// mapFileName is the file name of context name under maps/:
// base:allocation is base-allocation, qemu:X is X, and the bitmap name of
// qemu:dirty-bitmap:NAME is escaped so that it is one path component ("%"
// and "/" and NUL become %25, %2F, %00). ok is false when the name would
// exceed the 255 bytes a Linux file name may have.
func mapFileName(name string, json bool) (string, bool) {
	var s string
	switch {
	case name == metactx.BaseAllocation:
		s = "base-allocation"
	case strings.HasPrefix(name, metactx.DirtyBitmapPrefix):
		s = "dirty-bitmap-" + escapeName(strings.TrimPrefix(name, metactx.DirtyBitmapPrefix))
	default:
		s = strings.TrimPrefix(name, "qemu:")
	}
	if json {
		s += ".json"
	}
	return s, len(s) <= 255
}

func escapeName(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		switch c := s[i]; c {
		case '%':
			b.WriteString("%25")
		case '/':
			b.WriteString("%2F")
		case 0:
			b.WriteString("%00")
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}

// mapNode is maps/NAME or maps/NAME.json of one image.
type mapNode struct {
	fs.Inode
	img  *qcow2.Image
	name string // metadata context
	json bool
	tree *tree
}

var (
	_ = (fs.NodeOpener)((*mapNode)(nil))
	_ = (fs.NodeGetattrer)((*mapNode)(nil))
	_ = (fs.NodeSetattrer)((*mapNode)(nil))
	_ = (fs.FileReader)((*mapHandle)(nil))
)

// Open starts a new metactx.Map: every open file streams the map on its
// own, resumably, with memory bounded by one read plus one chunk.
// Direct I/O: the size is unknown until the walk ends, and the page cache
// must not keep (or clip to) a stale length.
func (n *mapNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if errno := readOnlyOpen(flags); errno != 0 {
		return nil, 0, errno
	}
	m := metactx.NewMap(n.name, metactx.Format{JSON: n.json}, n.img.Size(), metactx.ImageSource(n.img, n.name))
	h := &mapHandle{name: n.name, cur: m, tree: n.tree}
	return h, fuse.FOPEN_DIRECT_IO, 0
}

func (n *mapNode) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	n.tree.fileAttr(&out.Attr, 0o444, 0)
	return 0
}

func (n *mapNode) Setattr(ctx context.Context, f fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	return syscall.EROFS
}

// mapHandle is one open map file.
type mapHandle struct {
	name string
	mu   sync.Mutex // guards cur
	cur  *metactx.Map
	tree *tree
}

func (h *mapHandle) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	h.mu.Lock()
	defer h.mu.Unlock()
	n, err := h.cur.ReadAt(dest, off)
	if err != nil {
		h.tree.logf("map %s at output offset %d: %v", h.name, off, err)
		return nil, syscall.EIO
	}
	return fuse.ReadResultData(dest[:n]), 0
}
