package fusefs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/nbdgw/nbdgw/internal/metactx"
	"github.com/nbdgw/nbdgw/qcow2"
)

// Config configures a mount.
type Config struct {
	// Name is shown as the file system source in /proc/mounts
	// (typically the image path).
	Name string
	// Time is the modification time of every file (typically the
	// image's).
	Time time.Time
	// Logf receives engine errors that reach the file system as EIO.
	// Nil discards them.
	Logf func(format string, args ...any)
	// Debug logs every FUSE request.
	Debug bool
}

// Kernel I/O sizes: requests of up to 1 MiB (the kernel maximum, and
// max_read), and as much readahead (see setReadAhead).
const (
	maxIO        = 1 << 20
	maxReadAhead = 1 << 20
	// maxBackground bounds the asynchronous requests (readahead) the
	// kernel keeps in flight; the engine serves them in parallel.
	maxBackground = 64
	// cacheTimeout is how long the kernel may cache entries and
	// attributes: nothing changes in a read-only mount.
	cacheTimeout = time.Hour
	// writableAttrTimeout is how long attributes (st_blocks) may be
	// cached in a writable mount, where writes change them.
	writableAttrTimeout = time.Second
)

// ErrMountpoint is wrapped by the errors Mount returns for an unusable
// mount point.
var ErrMountpoint = errors.New("unusable mount point")

// CheckMountpoint reports why dir cannot be mounted on: missing, not a
// directory, not empty, or a dead FUSE mount left by a killed server.
func CheckMountpoint(dir string) error {
	err := checkMountpoint(dir)
	if errors.Is(err, syscall.ENOTCONN) {
		// The kernel may answer stat from its cache, and fail only
		// the open: whichever step met the dead connection, say so.
		return fmt.Errorf("%w: %s is a FUSE mount whose server is gone (run `fusermount3 -u %s` first)", ErrMountpoint, dir, dir)
	}
	return err
}

func checkMountpoint(dir string) error {
	fi, err := os.Stat(dir)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("%w: %s does not exist", ErrMountpoint, dir)
	case err != nil:
		return fmt.Errorf("%w: %w", ErrMountpoint, err)
	case !fi.IsDir():
		return fmt.Errorf("%w: %s is not a directory", ErrMountpoint, dir)
	}
	f, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrMountpoint, err)
	}
	defer f.Close()
	names, err := f.Readdirnames(1)
	if err != nil && err != io.EOF {
		return fmt.Errorf("%w: %w", ErrMountpoint, err)
	}
	if len(names) > 0 {
		return fmt.Errorf("%w: %s is not empty", ErrMountpoint, dir)
	}
	return nil
}

// Server is a mounted tree.
type Server struct {
	srv *fuse.Server
}

// Wait blocks until the file system is unmounted, by Unmount or by
// `fusermount3 -u`.
func (s *Server) Wait() { s.srv.Wait() }

// Unmount unmounts the file system. It fails (EBUSY) while files of the
// mount are in use.
func (s *Server) Unmount() error { return s.srv.Unmount() }

// Mount mounts the tree of img on dir (an existing empty directory) and
// serves it until unmounted. img must stay open until Wait returns.
func Mount(dir string, img *qcow2.Image, cfg Config) (*Server, error) {
	if err := CheckMountpoint(dir); err != nil {
		return nil, err
	}
	t := &tree{img: img, cfg: cfg}
	if t.cfg.Logf == nil {
		t.cfg.Logf = func(string, ...any) {}
	}
	timeout, attrTimeout := cacheTimeout, cacheTimeout
	mountOpts := []string{"ro"}
	if img.Writable() {
		attrTimeout, mountOpts = writableAttrTimeout, nil
	}
	opts := &fs.Options{
		EntryTimeout:    &timeout,
		AttrTimeout:     &attrTimeout,
		NegativeTimeout: &timeout,
		MountOptions: fuse.MountOptions{
			Options:       mountOpts,
			FsName:        cfg.Name,
			Name:          "nbdgw",
			MaxWrite:      maxIO,
			MaxReadAhead:  maxReadAhead,
			MaxBackground: maxBackground,
			DisableXAttrs: true,
			// Reads answer from memory: splicing them through a pipe
			// gains nothing and fails for 1 MiB requests (a pipe holds
			// at most 1 MiB, the reply has a header too).
			DisableSplice: true,
			Debug:         cfg.Debug,
		},
	}
	if opts.FsName == "" {
		opts.FsName = "nbdgw"
	}
	srv, err := fs.Mount(dir, &rootNode{dirNode{tree: t}}, opts)
	if err != nil {
		return nil, fmt.Errorf("mounting on %s: %w", dir, err)
	}
	setReadAhead(dir, maxReadAhead)
	return &Server{srv: srv}, nil
}

// setReadAhead raises the readahead of the mount's backing device info:
// at FUSE_INIT the kernel caps it at its default (128 KiB), which makes
// sequential reads of disk 128 KiB requests; larger ones cost fewer round
// trips through the FUSE device. Only root may write the sysfs knob; for
// others this is a no-op, and the kernel default stays.
//
// The device number comes from /proc/self/mountinfo, not from a stat of
// dir: nbdgw never touches its own mount, so a script that unmounts as
// soon as the mount appears does not find it busy with our own request.
func setReadAhead(dir string, bytes int) {
	dev, ok := mountDevice(dir)
	if !ok {
		return
	}
	_ = os.WriteFile("/sys/class/bdi/"+dev+"/read_ahead_kb", []byte(strconv.Itoa(bytes>>10)), 0)
}

// mountDevice returns the "major:minor" of the file system mounted last
// on dir, from /proc/self/mountinfo.
func mountDevice(dir string) (string, bool) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", false
	}
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return "", false
	}
	dev, found := "", false
	for _, line := range strings.Split(string(b), "\n") {
		// ID PARENT MAJOR:MINOR ROOT MOUNTPOINT ...; octal escapes
		// (\040 for a space) in the mount point.
		f := strings.Fields(line)
		if len(f) >= 5 && unescapeMountinfo(f[4]) == abs {
			dev, found = f[2], true
		}
	}
	return dev, found
}

func unescapeMountinfo(s string) string {
	if !strings.Contains(s, "\\") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// tree holds what every node of one mount shares.
type tree struct {
	img *qcow2.Image
	cfg Config
	gen atomic.Uint64 // counts writes, so that st_blocks is recomputed
}

// changed records that the image changed (after a write completed).
func (t *tree) changed() { t.gen.Add(1) }

func (t *tree) logf(format string, args ...any) { t.cfg.Logf(format, args...) }

func (t *tree) fileAttr(a *fuse.Attr, perm uint32, size uint64) {
	a.Mode = syscall.S_IFREG | perm
	a.Size = size
	a.Blksize = maxIO
	if !t.cfg.Time.IsZero() {
		a.SetTimes(&t.cfg.Time, &t.cfg.Time, &t.cfg.Time)
	}
}

// dirNode is a directory of the tree; its children are fixed at mount.
type dirNode struct {
	fs.Inode
	tree *tree
}

var _ = (fs.NodeGetattrer)((*dirNode)(nil))

func (n *dirNode) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = syscall.S_IFDIR | 0o555
	if !n.tree.cfg.Time.IsZero() {
		out.SetTimes(&n.tree.cfg.Time, &n.tree.cfg.Time, &n.tree.cfg.Time)
	}
	return 0
}

// rootNode builds the whole tree when the mount starts.
type rootNode struct {
	dirNode
}

var _ = (fs.NodeOnAdder)((*rootNode)(nil))

func (r *rootNode) OnAdd(ctx context.Context) {
	t := r.tree
	img := t.img
	add := func(parent *fs.Inode, name string, node fs.InodeEmbedder, mode uint32) *fs.Inode {
		ch := parent.NewPersistentInode(ctx, node, fs.StableAttr{Mode: mode})
		parent.AddChild(name, ch, false)
		return ch
	}
	dir := func(parent *fs.Inode, name string) *fs.Inode {
		return add(parent, name, &dirNode{tree: t}, syscall.S_IFDIR)
	}
	root := r.EmbeddedInode()
	// In a writable image only the top-level disk takes writes; the
	// windows that show what it writes (layer 1, the partitions) must
	// not serve stale pages from their own caches.
	w := img.Writable()
	top := newDiskNode(t, img, 0, img.Size())
	top.writable = w
	add(root, "disk", top, syscall.S_IFREG)
	if info, err := img.InfoJSON(); err != nil {
		t.logf("info.json: %v", err)
	} else {
		add(root, "info.json", &bytesNode{data: info, tree: t}, syscall.S_IFREG)
	}
	t.addMaps(ctx, dir(root, "maps"), img, add)

	layers := dir(root, "layers")
	for _, li := range img.Layers() {
		limg, err := img.Layer(li.Depth)
		if err != nil {
			t.logf("layer %d: %v", li.Depth, err)
			continue
		}
		ld := dir(layers, strconv.Itoa(li.Depth))
		ldisk := newDiskNode(t, limg, 0, limg.Size())
		ldisk.volatile = w && li.Depth == 1
		add(ld, "disk", ldisk, syscall.S_IFREG)
		t.addMaps(ctx, dir(ld, "maps"), limg, add)
	}

	parts := dir(root, "partitions")
	pt, err := Partitions(img, img.Size())
	if err != nil {
		t.logf("reading the partition table: %v", err)
	}
	for _, p := range pt {
		pdisk := newDiskNode(t, img, p.Start, p.Length)
		pdisk.volatile = w
		add(parts, "p"+strconv.Itoa(p.Number), pdisk, syscall.S_IFREG)
	}
}

func (t *tree) addMaps(ctx context.Context, dir *fs.Inode, img *qcow2.Image, add func(*fs.Inode, string, fs.InodeEmbedder, uint32) *fs.Inode) {
	for _, name := range metactx.Names(img) {
		for _, json := range []bool{false, true} {
			fn, ok := mapFileName(name, json)
			if !ok {
				t.logf("context %q: name too long for a file, skipped", name)
				continue
			}
			add(dir, fn, &mapNode{img: img, name: name, json: json, tree: t}, syscall.S_IFREG)
		}
	}
}
