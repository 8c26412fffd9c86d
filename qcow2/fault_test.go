package qcow2_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/nbdgw/nbdgw/internal/faultfs"
	"github.com/nbdgw/nbdgw/qcow2"
)

// The fault tests put a qcow2 image on a faultfs mount, write and flush it,
// make the storage fail a pwrite or an fsync, and check that the image
// fails for good (every later write, zero write, discard and flush fails
// with ErrFailed and EIO, even once the storage works again), that reads go
// on, and that what qemu-img finds in the backing directory afterwards is
// consistent (check exits 0 or 3) and holds every byte a successful flush
// acknowledged.

const (
	fsize   = 8 << 20
	fcsize  = 4096
	fblocks = fsize / fcsize
)

// faultImage is one image on a faultfs mount with what the guest was told
// is durable.
type faultImage struct {
	fs    *faultfs.FS
	name  string
	img   *qcow2.Image
	acked []byte // guest content as of the last successful flush
	cur   []byte // guest content as written since (unacknowledged)
	// touched marks blocks changed since the last successful flush: after
	// a failure they may hold either content.
	touched []bool
}

// newFaultImage creates a qcow2 image with 4 KiB clusters and 64-bit
// refcounts (a refcount block covers 2 MiB of the file, an L2 table 2 MiB
// of the guest, so small writes create both) and a persistent bitmap.
func newFaultImage(t *testing.T) *faultImage {
	t.Helper()
	needTools(t, "qemu-img", "qemu-io")
	back := t.TempDir()
	img(t, back, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096,refcount_bits=64", "f.qcow2", fmt.Sprint(fsize))
	img(t, back, "bitmap", "--add", "f.qcow2", "b0")
	ffs := faultfs.New(t, back)
	im, err := qcow2.Open(filepath.Join(ffs.Dir(), "f.qcow2"), qcow2.Options{Writable: true, Format: "qcow2", Warn: func(string) {}})
	if err != nil {
		t.Fatal(err)
	}
	f := &faultImage{fs: ffs, name: "f.qcow2", img: im, acked: make([]byte, fsize), cur: make([]byte, fsize), touched: make([]bool, fblocks)}
	t.Cleanup(func() {
		if f.img != nil {
			f.img.Close()
		}
	})
	return f
}

func pattern(seed byte, n int) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = seed + byte(i/512)
	}
	return p
}

func (f *faultImage) touch(off, n int64) {
	for b := off / fcsize; b < (off+n+fcsize-1)/fcsize; b++ {
		f.touched[b] = true
	}
}

func (f *faultImage) write(off int64, p []byte) error {
	f.touch(off, int64(len(p)))
	_, err := f.img.WriteAt(p, off)
	if err == nil {
		copy(f.cur[off:], p)
	}
	return err
}

func (f *faultImage) discard(off, n int64) error {
	f.touch(off, n)
	err := f.img.Discard(off, n)
	if err == nil {
		clear(f.cur[off : off+n])
	}
	return err
}

func (f *faultImage) flush() error {
	err := f.img.Flush()
	if err == nil {
		copy(f.acked, f.cur)
		clear(f.touched)
	}
	return err
}

// baseline writes and flushes a first generation: data in the first L2
// table, which phase two then discards and overwrites.
func (f *faultImage) baseline(t *testing.T) {
	t.Helper()
	for _, w := range []struct {
		off  int64
		seed byte
		n    int
	}{{0, 1, 64 << 10}, {1 << 20, 2, 100 << 10}, {5<<20 + 512, 3, 3000}} {
		if err := f.write(w.off, pattern(w.seed, w.n)); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.flush(); err != nil {
		t.Fatal(err)
	}
}

// phase2 is the workload during which faults strike: an overwrite in
// place, partial and whole new clusters in a new L2 table, new clusters
// past the first refcount block's range, a discard whose release the
// flush writes, and the flush itself. It returns the first error.
func (f *faultImage) phase2() error {
	steps := []func() error{
		func() error { return f.write(4096, pattern(10, 4096)) },
		func() error { return f.write(3<<20+100, pattern(11, 5000)) },
		func() error { return f.write(6<<20, pattern(12, 2<<20)) },
		func() error { return f.discard(1<<20, 64<<10) },
		f.flush,
	}
	for _, s := range steps {
		if err := s(); err != nil {
			return err
		}
	}
	return nil
}

// checkFailed checks that err is the image's failure and that the image
// stays failed, even once the storage recovers, while reads go on.
func (f *faultImage) checkFailed(t *testing.T, err error, cause syscall.Errno) {
	t.Helper()
	if err == nil {
		t.Fatal("the workload succeeded despite the fault")
	}
	if !errors.Is(err, qcow2.ErrFailed) || !errors.Is(err, syscall.EIO) || !errors.Is(err, cause) {
		t.Fatalf("error %v does not wrap ErrFailed, EIO and %v", err, cause)
	}
	f.fs.Clear() // the storage works again: the image must not
	for what, err := range map[string]error{
		"flush":        f.img.Flush(),
		"second flush": f.img.Flush(),
		"write":        func() error { _, err := f.img.WriteAt([]byte{1}, 0); return err }(),
		"zero write":   f.img.WriteZeroes(0, 4096, qcow2.ZeroMayUnmap),
		"fast zero":    f.img.WriteZeroes(0, 100, qcow2.ZeroFast),
		"discard":      f.img.Discard(0, 4096),
	} {
		if !errors.Is(err, qcow2.ErrFailed) || !errors.Is(err, syscall.EIO) {
			t.Errorf("%s after the failure: %v, want ErrFailed and EIO", what, err)
		}
	}
	got := make([]byte, fsize)
	if _, err := f.img.ReadAt(got, 0); err != nil {
		t.Fatalf("read after the failure: %v", err)
	}
	for b := 0; b < fblocks; b++ {
		lo, hi := b*fcsize, (b+1)*fcsize
		if !f.touched[b] && !bytes.Equal(got[lo:hi], f.acked[lo:hi]) {
			t.Fatalf("read after the failure: block %d (offset %d) changed", b, lo)
		}
	}
}

// closeAndCheck closes the failed image (which must not report success)
// and checks the file in the backing directory with QEMU: consistent, and
// every acknowledged byte outside what was touched since is there.
func (f *faultImage) closeAndCheck(t *testing.T) (checkExit int) {
	t.Helper()
	if err := f.img.Close(); err == nil {
		t.Error("Close of a failed image reported success")
	}
	f.img = nil
	dir := f.fs.Backing()
	cmd := exec.Command("qemu-img", "check", "-f", "qcow2", f.name)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee) && ee.ExitCode() == 3:
		checkExit = 3
	default:
		t.Fatalf("qemu-img check: %v\n%s", err, out)
	}
	raw := filepath.Join(t.TempDir(), "out.raw")
	if o, err := exec.Command("qemu-img", "convert", "-f", "qcow2", "-O", "raw", filepath.Join(dir, f.name), raw).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert: %v\n%s", err, o)
	}
	got, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	for b := 0; b < fblocks; b++ {
		lo, hi := b*fcsize, (b+1)*fcsize
		if !f.touched[b] && !bytes.Equal(got[lo:hi], f.acked[lo:hi]) {
			t.Fatalf("acknowledged block %d (offset %d) lost after the failure (qemu-img check exit %d)", b, lo, checkExit)
		}
	}
	return checkExit
}

// countPhase2 runs the workload without faults and counts its writes and
// fsyncs from the moment phase two starts, and those of its final flush.
func countPhase2(t *testing.T) (writes, fsyncs, flushWrites, flushFsyncs int) {
	f := newFaultImage(t)
	f.baseline(t)
	s0 := f.fs.Stats()
	steps := []func() error{
		func() error { return f.write(4096, pattern(10, 4096)) },
		func() error { return f.write(3<<20+100, pattern(11, 5000)) },
		func() error { return f.write(6<<20, pattern(12, 2<<20)) },
		func() error { return f.discard(1<<20, 64<<10) },
	}
	for _, s := range steps {
		if err := s(); err != nil {
			t.Fatal(err)
		}
	}
	s1 := f.fs.Stats()
	if err := f.flush(); err != nil {
		t.Fatal(err)
	}
	s2 := f.fs.Stats()
	return s2.Writes - s0.Writes, s2.Fsyncs - s0.Fsyncs, s2.Writes - s1.Writes, s2.Fsyncs - s1.Fsyncs
}

// TestFaultEveryWriteAndFsync fails, in turn, every pwrite and every fsync
// that phase two makes (data writes, then the flush's refcount blocks, L2
// tables, L1 entries and releases, and each fsync of the flush order).
func TestFaultEveryWriteAndFsync(t *testing.T) {
	writes, fsyncs, fw, ff := countPhase2(t)
	t.Logf("phase two: %d writes (%d in its flush), %d fsyncs (%d in its flush)", writes, fw, fsyncs, ff)
	if ff < 5 || fw < 4 {
		t.Fatalf("the flush made %d writes and %d fsyncs: the workload no longer exercises every step", fw, ff)
	}
	exits := map[int]int{}
	points := 0
	for _, op := range []faultfs.Op{faultfs.Write, faultfs.Fsync} {
		n := writes
		if op == faultfs.Fsync {
			n = fsyncs
		}
		for k := 0; k < n; k++ {
			name := fmt.Sprintf("write%d", k)
			if op == faultfs.Fsync {
				name = fmt.Sprintf("fsync%d", k)
			}
			t.Run(name, func(t *testing.T) {
				f := newFaultImage(t)
				f.baseline(t)
				// A failed write fails until the storage recovers: a
				// write the kernel cut short is retried for its rest
				// (os.File.WriteAt), and one failure of a retried chunk
				// is no failure of the pwrite. An fsync fails once.
				count := 0
				if op == faultfs.Fsync {
					count = 1
				}
				f.fs.Set(faultfs.Fault{Ops: op, Errno: syscall.EIO, After: k, Count: count})
				f.checkFailed(t, f.phase2(), syscall.EIO)
				exits[f.closeAndCheck(t)]++
				points++
			})
		}
	}
	t.Logf("%d fault points: qemu-img check exit 0: %d, exit 3 (leaks only): %d", points, exits[0], exits[3])
}

// TestFaultTwoFailedFlushesThenRecovery is the case from the issue: the
// storage fails fsync for a moment, two flushes fail, the storage
// recovers, and the next flush must still fail: the pages the failed fsync
// dropped are gone, and the refcounts of what the L2 tables point at may
// never have reached the disk.
func TestFaultTwoFailedFlushesThenRecovery(t *testing.T) {
	f := newFaultImage(t)
	f.baseline(t)
	if err := f.write(6<<20, pattern(7, 256<<10)); err != nil {
		t.Fatal(err)
	}
	f.fs.Set(faultfs.Fault{Ops: faultfs.Fsync | faultfs.Write, Errno: syscall.EIO, Count: 2})
	for i := 0; i < 2; i++ {
		if err := f.flush(); !errors.Is(err, qcow2.ErrFailed) {
			t.Fatalf("flush %d during the fault: %v", i+1, err)
		}
	}
	if st := f.fs.Stats(); st.Failed != 1 {
		t.Fatalf("the storage failed %d calls, want 1: a failed image must not retry", st.Failed)
	}
	f.fs.Clear()
	if err := f.flush(); !errors.Is(err, qcow2.ErrFailed) || !errors.Is(err, syscall.EIO) {
		t.Fatalf("flush after the storage recovered: %v, want ErrFailed", err)
	}
	f.checkFailed(t, f.flush(), syscall.EIO)
	f.closeAndCheck(t)
}

// TestFaultDiskFull fills the file system part way through the workload:
// writes fail with ENOSPC (which the front ends report as such), the image
// checks clean or with leaks only, and flushed data is intact.
func TestFaultDiskFull(t *testing.T) {
	for _, room := range []int64{0, 5000, 300 << 10, 1 << 20} {
		t.Run(fmt.Sprint(room), func(t *testing.T) {
			f := newFaultImage(t)
			f.baseline(t)
			f.fs.DiskFull(room, syscall.ENOSPC)
			err := f.phase2()
			f.checkFailed(t, err, syscall.ENOSPC)
			f.closeAndCheck(t)
		})
	}
}

// TestFaultClosePreservesInUse: a failure at Close (the bitmap store) or
// before it leaves the bitmap marked in_use; qemu-img check still accepts
// the image and QEMU treats the bitmap as inconsistent.
func TestFaultClosePreservesInUse(t *testing.T) {
	f := newFaultImage(t)
	f.baseline(t)
	f.fs.Set(faultfs.Fault{Ops: faultfs.Write, Errno: syscall.EIO})
	if err := f.img.Close(); !errors.Is(err, qcow2.ErrFailed) {
		t.Fatalf("Close with failing writes: %v", err)
	}
	f.img = nil
	f.fs.Clear()
	out := run(t, f.fs.Backing(), "qemu-img", "info", "--output=json", f.name)
	if !strings.Contains(out, `"in-use"`) {
		t.Fatalf("bitmap not marked in use after a failed close:\n%s", out)
	}
	cmd := exec.Command("qemu-img", "check", f.name)
	cmd.Dir = f.fs.Backing()
	o, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if err != nil && !(errors.As(err, &ee) && ee.ExitCode() == 3) {
		t.Fatalf("qemu-img check: %v\n%s", err, o)
	}
}

// TestFaultRaw: a raw image fails for good too.
func TestFaultRaw(t *testing.T) {
	needTools(t, "qemu-img")
	back := t.TempDir()
	img(t, back, "create", "-q", "-f", "raw", "r.raw", "1M")
	ffs := faultfs.New(t, back)
	im, err := qcow2.Open(filepath.Join(ffs.Dir(), "r.raw"), qcow2.Options{Writable: true, Format: "raw"})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	if _, err := im.WriteAt(pattern(5, 8192), 0); err != nil {
		t.Fatal(err)
	}
	if err := im.Flush(); err != nil {
		t.Fatal(err)
	}
	ffs.Set(faultfs.Fault{Ops: faultfs.Write, Errno: syscall.EIO, Count: 1})
	if _, err := im.WriteAt(pattern(6, 4096), 65536); !errors.Is(err, qcow2.ErrFailed) {
		t.Fatalf("write on failing storage: %v", err)
	}
	for what, err := range map[string]error{
		"flush":      im.Flush(),
		"zero write": im.WriteZeroes(0, 4096, 0),
		"discard":    im.Discard(0, 4096),
	} {
		if !errors.Is(err, qcow2.ErrFailed) || !errors.Is(err, syscall.EIO) {
			t.Errorf("%s after the failure: %v", what, err)
		}
	}
	got := make([]byte, 8192)
	if _, err := im.ReadAt(got, 0); err != nil || !bytes.Equal(got, pattern(5, 8192)) {
		t.Fatalf("read after the failure: %v", err)
	}
}

// TestFaultRefcountTableMove fails the steps of a flush that moves the
// refcount table (512-byte clusters and 64-bit refcounts: the table's one
// cluster covers 2 MiB of the file): the header's pointer to the new table
// and each fsync of that flush.
func TestFaultRefcountTableMove(t *testing.T) {
	needTools(t, "qemu-img")
	setup := func(t *testing.T) *faultImage {
		back := t.TempDir()
		img(t, back, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", "f.qcow2", fmt.Sprint(fsize))
		ffs := faultfs.New(t, back)
		im, err := qcow2.Open(filepath.Join(ffs.Dir(), "f.qcow2"), qcow2.Options{Writable: true, Format: "qcow2"})
		if err != nil {
			t.Fatal(err)
		}
		f := &faultImage{fs: ffs, name: "f.qcow2", img: im, acked: make([]byte, fsize), cur: make([]byte, fsize), touched: make([]bool, fblocks)}
		t.Cleanup(func() {
			if f.img != nil {
				f.img.Close()
			}
		})
		if err := f.write(0, pattern(1, 64<<10)); err != nil {
			t.Fatal(err)
		}
		if err := f.flush(); err != nil {
			t.Fatal(err)
		}
		if err := f.write(1<<20, pattern(2, 3<<20)); err != nil {
			t.Fatal(err)
		}
		return f
	}
	f := setup(t)
	s0 := f.fs.Stats()
	if err := f.flush(); err != nil {
		t.Fatal(err)
	}
	s1 := f.fs.Stats()
	t.Logf("flush moving the table: %d writes, %d fsyncs", s1.Writes-s0.Writes, s1.Fsyncs-s0.Fsyncs)
	fsyncs := s1.Fsyncs - s0.Fsyncs
	if err := f.img.Close(); err != nil {
		t.Fatal(err)
	}
	f.img = nil
	if code := f.closeCheckOnly(t); code != 0 {
		t.Fatalf("the table move without faults left qemu-img check exit %d", code)
	}
	exits := map[int]int{}
	t.Run("header", func(t *testing.T) {
		f := setup(t)
		f.fs.Set(faultfs.Fault{Ops: faultfs.Write, Errno: syscall.EIO, Off: 48, Len: 12})
		f.checkFailed(t, f.flush(), syscall.EIO)
		if st := f.fs.Stats(); st.Failed == 0 {
			t.Fatal("the flush never wrote the header")
		}
		exits[f.closeAndCheck(t)]++
	})
	for k := 0; k < fsyncs; k++ {
		t.Run(fmt.Sprintf("fsync%d", k), func(t *testing.T) {
			f := setup(t)
			f.fs.Set(faultfs.Fault{Ops: faultfs.Fsync, Errno: syscall.EIO, After: k, Count: 1})
			f.checkFailed(t, f.flush(), syscall.EIO)
			exits[f.closeAndCheck(t)]++
		})
	}
	t.Logf("%d fault points: qemu-img check exit 0: %d, exit 3: %d", 1+fsyncs, exits[0], exits[3])
}

// closeCheckOnly runs qemu-img check on the closed image and returns its
// exit status (0 or 3; anything else fails the test).
func (f *faultImage) closeCheckOnly(t *testing.T) int {
	t.Helper()
	cmd := exec.Command("qemu-img", "check", "-f", "qcow2", f.name)
	cmd.Dir = f.fs.Backing()
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &ee) && ee.ExitCode() == 3:
		return 3
	}
	t.Fatalf("qemu-img check: %v\n%s", err, out)
	return -1
}

// TestFaultEveryCloseStep fails, in turn, each write and fsync of Close
// (storing the persistent bitmap back: its data, refcounts, table, the
// release of the old cluster, clearing in_use) after a successful flush:
// Close fails, the image checks, the flushed data is there.
func TestFaultEveryCloseStep(t *testing.T) {
	setup := func(t *testing.T) *faultImage {
		f := newFaultImage(t)
		f.baseline(t)
		if err := f.write(3<<20, pattern(9, 8192)); err != nil {
			t.Fatal(err)
		}
		if err := f.flush(); err != nil {
			t.Fatal(err)
		}
		return f
	}
	f := setup(t)
	s0 := f.fs.Stats()
	if err := f.img.Close(); err != nil {
		t.Fatal(err)
	}
	f.img = nil
	s1 := f.fs.Stats()
	writes, fsyncs := s1.Writes-s0.Writes, s1.Fsyncs-s0.Fsyncs
	t.Logf("Close: %d writes, %d fsyncs", writes, fsyncs)
	if writes < 3 || fsyncs < 3 {
		t.Fatalf("Close made %d writes and %d fsyncs: the bitmap is no longer stored", writes, fsyncs)
	}
	exits := map[int]int{}
	for _, op := range []faultfs.Op{faultfs.Write, faultfs.Fsync} {
		n := writes
		if op == faultfs.Fsync {
			n = fsyncs
		}
		for k := 0; k < n; k++ {
			t.Run(fmt.Sprintf("%v-%d", map[faultfs.Op]string{faultfs.Write: "write", faultfs.Fsync: "fsync"}[op], k), func(t *testing.T) {
				f := setup(t)
				f.fs.Set(faultfs.Fault{Ops: op, Errno: syscall.EIO, After: k})
				err := f.img.Close()
				f.img = nil
				if !errors.Is(err, qcow2.ErrFailed) || !errors.Is(err, syscall.EIO) {
					t.Fatalf("Close on failing storage: %v", err)
				}
				f.fs.Clear()
				exits[f.closeCheckOnly(t)]++
				raw := filepath.Join(t.TempDir(), "out.raw")
				run(t, f.fs.Backing(), "qemu-img", "convert", "-f", "qcow2", "-O", "raw", f.name, raw)
				got, err := os.ReadFile(raw)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, f.acked) {
					t.Fatal("flushed data changed after a failed Close")
				}
			})
		}
	}
	t.Logf("%d close-time fault points: qemu-img check exit 0: %d, exit 3: %d", writes+fsyncs, exits[0], exits[3])
}
