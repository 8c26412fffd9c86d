// Package faultfs is a fault-injection file system for tests: a loopback
// FUSE mount that passes everything through to a backing directory but
// fails pwrite and/or fsync with an errno (EIO, ENOSPC, ...) on command.
//
// A test mounts it with New, puts files in the backing directory (or
// through the mount), points the program under test at the mount, and
// switches faults on and off at run time with Set, Clear and DiskFull. The
// mount is served by the test process, so the program under test may run
// in this process or in a child process; it must not be the FUSE server
// itself.
//
// Files are opened with FOPEN_DIRECT_IO: every read and write reaches the
// server (no page cache in between), so a failed write is never read back
// from the kernel's cache and every pwrite and fsync of the program is one
// decision of the fault rules.
package faultfs

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// Op is a set of file operations a Fault applies to.
type Op int

const (
	Write Op = 1 << iota // pwrite (FUSE WRITE)
	Fsync                // fsync and fdatasync (FUSE FSYNC)
)

// Fault is one rule. Calls of the kinds in Ops are counted from the moment
// it is set: the first After of them pass, the next Count fail with Errno
// (Count 0: all of them, until Clear), then they pass again.
type Fault struct {
	Ops   Op
	Errno syscall.Errno
	After int
	Count int
	// Off, Len restrict a write fault to writes overlapping host bytes
	// [Off, Off+Len) of any file (Len 0: every write). Writes outside the
	// range pass without being counted; fsyncs are not restricted.
	Off, Len int64
}

// Stats counts the calls the mount has seen since New.
type Stats struct {
	Writes, Fsyncs int // calls that reached the rules
	Failed         int // calls failed on purpose
	WrittenBytes   int64
}

// FS is a mounted fault-injection file system.
type FS struct {
	backing, mnt string
	srv          *fuse.Server

	mu      sync.Mutex
	fault   *Fault
	seen    int   // matching calls since the fault was set
	full    bool  // DiskFull is on
	room    int64 // bytes still writable under DiskFull
	fullErr syscall.Errno
	stats   Stats
}

// New mounts a fault-injection view of backing on a new directory under
// t.TempDir() and unmounts it when the test ends. With no fault set it
// behaves as the backing directory.
func New(t testing.TB, backing string) *FS {
	t.Helper()
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Fatalf("faultfs needs /dev/fuse: %v", err)
	}
	f := &FS{backing: backing, mnt: t.TempDir()}
	root := &fs.LoopbackRoot{Path: backing}
	var st syscall.Stat_t
	if err := syscall.Stat(backing, &st); err != nil {
		t.Fatal(err)
	}
	root.Dev = st.Dev
	node := &faultNode{LoopbackNode: &fs.LoopbackNode{RootData: root}, fs: f}
	root.RootNode = node
	zero := time.Duration(0)
	srv, err := fs.Mount(f.mnt, node, &fs.Options{
		EntryTimeout:    &zero,
		AttrTimeout:     &zero,
		NegativeTimeout: &zero,
		MountOptions: fuse.MountOptions{
			FsName:        "faultfs",
			Name:          "faultfs",
			DirectMount:   true, // falls back to fusermount3 when not root
			DisableXAttrs: true,
			AllowOther:    os.Geteuid() == 0,
		},
	})
	if err != nil {
		t.Fatalf("mounting faultfs on %s: %v", f.mnt, err)
	}
	f.srv = srv
	t.Cleanup(func() { f.unmount(t) })
	return f
}

// unmount unmounts, lazily if something still holds a file open, and waits
// a bounded time for the server to stop.
func (f *FS) unmount(t testing.TB) {
	f.Clear()
	if err := f.srv.Unmount(); err != nil {
		if err := syscall.Unmount(f.mnt, syscall.MNT_DETACH); err != nil {
			exec.Command("fusermount3", "-u", "-z", f.mnt).Run()
		}
	}
	done := make(chan struct{})
	go func() { f.srv.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Errorf("faultfs on %s did not stop within 10s", f.mnt)
	}
}

// Dir is the mount point: the backing directory's files, with faults.
func (f *FS) Dir() string { return f.mnt }

// Backing is the backing directory, where files are as they really are.
func (f *FS) Backing() string { return f.backing }

// Set replaces the fault rule and restarts its count.
func (f *FS) Set(r Fault) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fault, f.seen = &r, 0
}

// DiskFull makes the file system full after n more bytes are written: a
// write that does not fit in what is left fails whole with errno (ENOSPC
// for a real full disk). Fsync keeps working.
func (f *FS) DiskFull(n int64, errno syscall.Errno) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.full, f.room, f.fullErr = true, n, errno
}

// Clear removes every fault: the storage recovers.
func (f *FS) Clear() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fault, f.full = nil, false
}

// Stats returns the counts so far.
func (f *FS) Stats() Stats {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.stats
}

// decide returns the errno a call fails with, or 0 to pass it through.
func (f *FS) decide(op Op, off, n int64) syscall.Errno {
	f.mu.Lock()
	defer f.mu.Unlock()
	if op == Write {
		f.stats.Writes++
	} else {
		f.stats.Fsyncs++
	}
	if r := f.fault; r != nil && r.Ops&op != 0 &&
		(op != Write || r.Len == 0 || (off < r.Off+r.Len && off+n > r.Off)) {
		f.seen++
		if f.seen > r.After && (r.Count == 0 || f.seen <= r.After+r.Count) {
			f.stats.Failed++
			return r.Errno
		}
	}
	if op == Write && f.full {
		if n > f.room {
			f.stats.Failed++
			return f.fullErr
		}
		f.room -= n
	}
	if op == Write {
		f.stats.WrittenBytes += n
	}
	return 0
}

// faultNode is a loopback node whose files go through the fault rules.
type faultNode struct {
	*fs.LoopbackNode
	fs *FS
}

var (
	_ fs.NodeWrapChilder = (*faultNode)(nil)
	_ fs.NodeOpener      = (*faultNode)(nil)
	_ fs.NodeCreater     = (*faultNode)(nil)
)

func (n *faultNode) WrapChild(ctx context.Context, ops fs.InodeEmbedder) fs.InodeEmbedder {
	if l, ok := ops.(*fs.LoopbackNode); ok {
		return &faultNode{LoopbackNode: l, fs: n.fs}
	}
	return ops
}

func (n *faultNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	fh, fl, errno := n.LoopbackNode.Open(ctx, flags)
	if errno != 0 {
		return nil, 0, errno
	}
	return n.wrap(fh), fl | fuse.FOPEN_DIRECT_IO, 0
}

func (n *faultNode) Create(ctx context.Context, name string, flags uint32, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	ino, fh, fl, errno := n.LoopbackNode.Create(ctx, name, flags, mode, out)
	if errno != 0 {
		return nil, nil, 0, errno
	}
	return ino, n.wrap(fh), fl | fuse.FOPEN_DIRECT_IO, 0
}

func (n *faultNode) wrap(fh fs.FileHandle) fs.FileHandle {
	lf, ok := fh.(*fs.LoopbackFile)
	if !ok {
		panic(fmt.Sprintf("faultfs: loopback handle of type %T", fh))
	}
	return &faultFile{f: lf, fs: n.fs}
}

// faultFile delegates to a loopback file, through the rules for writes and
// fsyncs. It implements no passthrough (the kernel would then bypass it)
// and no locking (the kernel then keeps locks itself, per mount).
type faultFile struct {
	f  *fs.LoopbackFile
	fs *FS
}

var (
	_ fs.FileReader    = (*faultFile)(nil)
	_ fs.FileWriter    = (*faultFile)(nil)
	_ fs.FileFsyncer   = (*faultFile)(nil)
	_ fs.FileFlusher   = (*faultFile)(nil)
	_ fs.FileReleaser  = (*faultFile)(nil)
	_ fs.FileGetattrer = (*faultFile)(nil)
	_ fs.FileSetattrer = (*faultFile)(nil)
	_ fs.FileLseeker   = (*faultFile)(nil)
	_ fs.FileAllocater = (*faultFile)(nil)
)

func (h *faultFile) Read(ctx context.Context, buf []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	return h.f.Read(ctx, buf, off)
}

func (h *faultFile) Write(ctx context.Context, data []byte, off int64) (uint32, syscall.Errno) {
	if errno := h.fs.decide(Write, off, int64(len(data))); errno != 0 {
		return 0, errno
	}
	return h.f.Write(ctx, data, off)
}

func (h *faultFile) Fsync(ctx context.Context, flags uint32) syscall.Errno {
	if errno := h.fs.decide(Fsync, 0, 0); errno != 0 {
		return errno
	}
	return h.f.Fsync(ctx, flags)
}

func (h *faultFile) Flush(ctx context.Context) syscall.Errno { return h.f.Flush(ctx) }

func (h *faultFile) Release(ctx context.Context) syscall.Errno { return h.f.Release(ctx) }

func (h *faultFile) Getattr(ctx context.Context, out *fuse.AttrOut) syscall.Errno {
	return h.f.Getattr(ctx, out)
}

func (h *faultFile) Setattr(ctx context.Context, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	return h.f.Setattr(ctx, in, out)
}

func (h *faultFile) Lseek(ctx context.Context, off uint64, whence uint32) (uint64, syscall.Errno) {
	return h.f.Lseek(ctx, off, whence)
}

func (h *faultFile) Allocate(ctx context.Context, off, size uint64, mode uint32) syscall.Errno {
	return h.f.Allocate(ctx, off, size, mode)
}
