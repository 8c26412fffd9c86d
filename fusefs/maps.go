package fusefs

import (
	"context"
	"errors"
	"strings"
	"sync"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/nbdgw/nbdgw/metactx"
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

// Open starts a new cursor: every open file streams the map on its own.
// Direct I/O: the size is unknown until the walk ends, and the page cache
// must not keep (or clip to) a stale length.
func (n *mapNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if errno := readOnlyOpen(flags); errno != 0 {
		return nil, 0, errno
	}
	img, name := n.img, n.name
	walk := func(off int64, fn func(off, length int64, flags uint32) error) error {
		return metactx.Walk(img, name, off, img.Size()-off, fn)
	}
	h := &mapHandle{cur: newMapCursor(name, n.json, walk), tree: n.tree}
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
	mu   sync.Mutex // guards cur
	cur  *mapCursor
	tree *tree
}

func (h *mapHandle) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	h.mu.Lock()
	defer h.mu.Unlock()
	n, err := h.cur.readAt(dest, off)
	if err != nil {
		h.tree.logf("map %s at output offset %d: %v", h.cur.name, off, err)
		return nil, syscall.EIO
	}
	return fuse.ReadResultData(dest[:n]), 0
}

// walkFunc walks a context from image offset off to the end of the image.
type walkFunc func(off int64, fn func(off, length int64, flags uint32) error) error

// mapChunk is how much text a cursor generates beyond what a read needs
// before it pauses the walk, so that resuming costs little per byte.
const mapChunk = 64 << 10

// errPause stops a walk once the cursor has generated enough.
var errPause = errors.New("pause")

// mapCursor produces the byte stream of metactx.WriteMap for one context,
// resumably: buf holds output bytes [pos, pos+len(buf)) and the walk
// continues at image offset next. Coalesced extents are maximal runs of
// equal flags, so a walk resumed at the end of the last run it delivered
// yields exactly the runs the uninterrupted walk would have.
type mapCursor struct {
	name string
	json bool
	walk walkFunc

	pos     int64  // output offset of buf[0]
	buf     []byte // generated, not yet discarded output
	next    int64  // image offset where the walk resumes
	started bool   // the JSON opening bracket is out
	entries bool   // at least one entry is out (JSON separators)
	done    bool   // the walk reached the end and the output is complete
}

func newMapCursor(name string, json bool, walk walkFunc) *mapCursor {
	return &mapCursor{name: name, json: json, walk: walk}
}

func (c *mapCursor) reset() {
	c.pos, c.buf, c.next = 0, c.buf[:0], 0
	c.started, c.entries, c.done = false, false, false
}

// readAt fills p with output bytes from off, as io.ReaderAt does but
// returning 0 and no error at the end. Bytes before off are discarded
// (a later read below off restarts the walk).
func (c *mapCursor) readAt(p []byte, off int64) (int, error) {
	if off < c.pos {
		c.reset()
	}
	want := off + int64(len(p))
	for !c.done && c.pos+int64(len(c.buf)) < want {
		// Drop what lies before off so that memory stays bounded by
		// one read plus one chunk, however long the map.
		if skip := off - c.pos; skip > 0 {
			skip = min(skip, int64(len(c.buf)))
			c.buf = c.buf[:copy(c.buf, c.buf[skip:])]
			c.pos += skip
		}
		if err := c.generate(int(want-c.pos) + mapChunk); err != nil {
			return 0, err
		}
	}
	if off >= c.pos+int64(len(c.buf)) {
		return 0, nil
	}
	return copy(p, c.buf[off-c.pos:]), nil
}

// generate appends output until buf holds at least target bytes or the
// map is complete.
func (c *mapCursor) generate(target int) error {
	if !c.started {
		c.started = true
		if c.json {
			c.buf = append(c.buf, metactx.JSONOpen...)
		}
	}
	err := c.walk(c.next, func(off, n int64, flags uint32) error {
		if c.json {
			if c.entries {
				c.buf = append(c.buf, metactx.JSONSep...)
			}
			c.buf = metactx.AppendJSON(c.buf, c.name, off, n, flags)
		} else {
			c.buf = metactx.AppendText(c.buf, c.name, off, n, flags)
		}
		c.entries = true
		c.next = off + n
		if len(c.buf) >= target {
			return errPause
		}
		return nil
	})
	switch err {
	case nil:
		if c.json {
			c.buf = append(c.buf, metactx.JSONClose...)
		}
		c.done = true
		return nil
	case errPause:
		return nil
	default:
		return err
	}
}
