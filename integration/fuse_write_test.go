package integration

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/nbdgw/nbdgw/qcow2"
	"golang.org/x/sys/unix"
)

// TestFUSEWritable drives `nbdgw mount --writable` with real programs and
// checks every result against QEMU's tools reading the image afterwards.
func TestFUSEWritable(t *testing.T) {
	fuseRequire(t)
	bin := nbdgwBinary(t)
	t.Run("random", func(t *testing.T) {
		for _, kind := range []string{"backing", "extended-l2", "compressed", "small-clusters", "raw"} {
			t.Run(kind, func(t *testing.T) { fuseWriteRandom(t, bin, kind) })
		}
	})
	t.Run("semantics", func(t *testing.T) { fuseWriteSemantics(t, bin) })
	t.Run("punch-hole", func(t *testing.T) { fuseWritePunchHole(t, bin) })
	t.Run("mkfs-ext4", func(t *testing.T) { fuseWriteMkfs(t, bin) })
	t.Run("partition-view", func(t *testing.T) { fuseWritePartitionView(t, bin) })
	t.Run("signal-while-busy", func(t *testing.T) { fuseWriteSignalBusy(t, bin) })
	t.Run("kill-9", func(t *testing.T) { fuseWriteCrash(t, bin) })
}

// fuseWriteSignalBusy: SIGTERM while a writer keeps disk open cannot
// unmount (EBUSY), but flushes: the writes are in the image file for
// qemu-img at once. Once the file is closed, a second SIGTERM ends it.
func fuseWriteSignalBusy(t *testing.T, bin string) {
	dir := t.TempDir()
	img := filepath.Join(dir, "busy.qcow2")
	runOutput(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "8M")
	m := fuseStart(t, bin, img, "--writable")
	f, err := os.OpenFile(filepath.Join(m.dir, "disk"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	data := bytes.Repeat([]byte("busy "), 100000)
	if _, err := f.WriteAt(data, 12345); err != nil {
		t.Fatal(err)
	}
	m.cmd.Process.Signal(syscall.SIGTERM)
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(m.stderr.String(), "still serving") && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if !strings.Contains(m.stderr.String(), "still serving") {
		t.Fatalf("nbdgw mount did not report the busy mount:\n%s", m.stderr)
	}
	// Read the image file in this process: running qemu-img would fork,
	// and the child's closing its copy of f would send a FLUSH itself.
	ro, err := qcow2.Open(img, qcow2.Options{ForceShare: true, Warn: func(string) {}}) // -U: the mount still holds its write lock
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data))
	_, err = ro.ReadAt(got, 12345)
	ro.Close()
	if err != nil || !bytes.Equal(got, data) {
		t.Errorf("after SIGTERM with disk open, the image file does not hold the write (%v)", err)
	}
	f.Close()
	m.cmd.Process.Signal(syscall.SIGTERM)
	if err := m.wait(t); err != nil {
		t.Fatalf("second SIGTERM: %v\n%s", err, m.stderr)
	}
	fuseQemuCheck(t, img)
}

// fuseWriteCrash: kill -9 of nbdgw in the middle of writes. qemu-img
// check then finds no corruption (exit 0, or 3 for leaked clusters only),
// and every byte written before the last completed fsync is there; bytes
// written after it are either old or new.
func fuseWriteCrash(t *testing.T, bin string) {
	dir := t.TempDir()
	img, _ := fuseWriteImage(t, dir, "backing")
	shadow := fuseQemuRaw(t, img)
	size := int64(len(shadow))
	durable := bytes.Clone(shadow)
	m := fuseStart(t, bin, img, "--writable")
	f, err := os.OpenFile(filepath.Join(m.dir, "disk"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rng := rand.New(rand.NewPCG(9, 9))
	buf := make([]byte, 256<<10)
	unsynced := make([]bool, size) // written since the last fsync
	for i := range 75 {
		if i%10 == 9 {
			if err := f.Sync(); err != nil {
				t.Fatal(err)
			}
			copy(durable, shadow)
			clear(unsynced)
			continue
		}
		n := 1 + rng.Int64N(int64(len(buf)))
		off := rng.Int64N(size - n + 1)
		fillRandom(rng, buf[:n])
		if _, err := f.WriteAt(buf[:n], off); err != nil {
			t.Fatal(err)
		}
		copy(shadow[off:], buf[:n])
		for j := off; j < off+n; j++ {
			unsynced[j] = true
		}
	}
	m.cmd.Process.Kill()
	m.wait(t)
	f.Close()
	runOutput(t, "fusermount3", "-u", "-z", m.dir)

	out, err := exec.Command("qemu-img", "check", img).CombinedOutput()
	var ee *exec.ExitError
	if err != nil && !(errors.As(err, &ee) && ee.ExitCode() == 3) {
		t.Errorf("qemu-img check after kill -9: %v (want exit 0 or 3)\n%s", err, out)
	}
	got := fuseQemuRaw(t, img)
	bad := 0
	for i := range got {
		if !unsynced[i] && got[i] != durable[i] {
			if bad == 0 {
				t.Errorf("after kill -9: byte %d is %#x, fsynced %#x", i, got[i], durable[i])
			}
			bad++
		}
	}
	if bad > 0 {
		t.Errorf("after kill -9: %d bytes differ from what was fsynced", bad)
	}
}

// fuseWritePartitionView: in a writable mount partitions/pN stays
// read-only and shows writes made through disk at once, even to a reader
// that read (and could have cached) it before.
func fuseWritePartitionView(t *testing.T, bin string) {
	fuseRequire(t, "sfdisk")
	dir := t.TempDir()
	raw := filepath.Join(dir, "mbr.raw")
	runOutput(t, "qemu-img", "create", "-q", "-f", "raw", raw, "8M")
	cmd := exec.Command("sfdisk", "-q", "--no-reread", "--no-tell-kernel", raw)
	cmd.Stdin = strings.NewReader("label: dos\nstart=2048,size=4096,type=83\n")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("sfdisk: %v\n%s", err, out)
	}
	img := filepath.Join(dir, "mbr.qcow2")
	runOutput(t, "qemu-img", "convert", "-O", "qcow2", raw, img)
	m := fuseStart(t, bin, img, "--writable")
	p1 := filepath.Join(m.dir, "partitions", "p1")
	if f, err := os.OpenFile(p1, os.O_RDWR, 0); !errors.Is(err, syscall.EROFS) {
		if err == nil {
			f.Close()
		}
		t.Errorf("open partitions/p1 O_RDWR in a writable mount: %v, want EROFS", err)
	}
	r, err := os.Open(p1)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	before := make([]byte, 4096)
	if _, err := r.ReadAt(before, 8192); err != nil {
		t.Fatal(err)
	}
	msg := bytes.Repeat([]byte("partition "), 400)
	f, err := os.OpenFile(filepath.Join(m.dir, "disk"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(msg, 2048*512+8192); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(msg))
	if _, err := r.ReadAt(got, 8192); err != nil || !bytes.Equal(got, msg) {
		t.Errorf("partitions/p1 after a write through disk: %q..., %v; want the bytes written", got[:20], err)
	}
}

// fuseWriteImage builds a 32 MiB image of the given kind in dir and
// returns it with the files below it (which must never change).
//   - backing: a qcow2 over a qcow2 backing file with data, compressed
//     and zero clusters, the top with its own data and zero clusters;
//   - extended-l2: an extended-L2 qcow2 (subclusters) over that backing
//     file, with sub-cluster writes already in it;
//   - compressed: a standalone qcow2 written by `qemu-img convert -c`;
//   - small-clusters: 512-byte clusters and 16-bit refcounts over the
//     backing file, so that writes grow the refcount table and dirty more
//     L2 tables than the engine keeps before flushing;
//   - raw: a raw file (holes punched for zeroes).
func fuseWriteImage(t *testing.T, dir, kind string) (string, []string) {
	t.Helper()
	const size = "32M"
	base := filepath.Join(dir, "base.qcow2")
	mkBase := func() {
		runOutput(t, "qemu-img", "create", "-q", "-f", "qcow2", base, size)
		runOutput(t, "qemu-io", "-f", "qcow2",
			"-c", "write -P 0x11 0 6M",
			"-c", "write -c -P 0x12 8M 1M",
			"-c", "write -z 10M 1M",
			"-c", "write -P 0x13 20M 5M",
			"-c", "write -P 0x14 31M 1M",
			base)
	}
	top := filepath.Join(dir, "top.qcow2")
	switch kind {
	case "backing":
		mkBase()
		runOutput(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, size)
		runOutput(t, "qemu-io", "-f", "qcow2",
			"-c", "write -P 0x21 1M 1M",
			"-c", "write -z 2M 512k",
			"-c", "write -c -P 0x22 12M 256k",
			"-c", "write -P 0x23 22M 64k",
			top)
		return top, []string{base}
	case "extended-l2":
		mkBase()
		runOutput(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k",
			"-b", "base.qcow2", "-F", "qcow2", top, size)
		runOutput(t, "qemu-io", "-f", "qcow2",
			"-c", "write -P 0x31 100k 5k",
			"-c", "write -P 0x32 1M 2k",
			"-c", "write -z 3000k 8k",
			"-c", "write -P 0x33 21M 300k",
			top)
		return top, []string{base}
	case "compressed":
		raw := filepath.Join(dir, "src.raw")
		runOutput(t, "qemu-img", "create", "-q", "-f", "raw", raw, size)
		runOutput(t, "qemu-io", "-f", "raw",
			"-c", "write -P 0x41 0 4M",
			"-c", "write -P 0x42 5M 3M",
			"-c", "write -P 0x43 16M 7M",
			"-c", "write -P 0x44 30M 2M",
			raw)
		runOutput(t, "qemu-img", "convert", "-q", "-c", "-O", "qcow2", raw, top)
		return top, nil
	case "small-clusters":
		mkBase()
		runOutput(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512",
			"-b", "base.qcow2", "-F", "qcow2", top, size)
		runOutput(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x51 3M 100k", top)
		return top, []string{base}
	case "raw":
		raw := filepath.Join(dir, "disk.raw")
		runOutput(t, "qemu-img", "create", "-q", "-f", "raw", raw, size)
		runOutput(t, "qemu-io", "-f", "raw", "-c", "write -P 0x61 1M 3M", "-c", "write -P 0x62 20M 1M", raw)
		return raw, nil
	}
	t.Fatalf("unknown image kind %q", kind)
	return "", nil
}

// fuseWriteRandom: seeded random writes, punch-holes, zero-ranges and
// fsyncs through the mounted disk against a shadow copy. After each batch:
// fsync, then the disk read through the page cache, read with O_DIRECT
// (straight from the engine) and `qemu-img convert -U` of the image file
// all equal the shadow. After unmounting: qemu-img convert equals the
// shadow, qemu-img check exits 0, and the backing file is unchanged.
func fuseWriteRandom(t *testing.T, bin, kind string) {
	dir := t.TempDir()
	img, below := fuseWriteImage(t, dir, kind)
	before := map[string]string{}
	for _, f := range below {
		before[f] = fuseSHA(t, f)
	}
	shadow := fuseQemuRaw(t, img)
	size := int64(len(shadow))

	args := []string{"--writable"}
	if kind == "raw" {
		// Random writes reach sector 0: give the format, as QEMU
		// wants, so that no probed-raw restriction (nor its warning)
		// applies.
		args = append(args, "-f", "raw")
	}
	m := fuseStart(t, bin, img, args...)
	disk := filepath.Join(m.dir, "disk")
	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()

	seed := uint64(len(kind)) * 0x9e3779b97f4a7c15
	rng := rand.New(rand.NewPCG(seed, 6))
	t.Logf("seed %#x", seed)
	const batches, perBatch = 4, 75
	buf := make([]byte, 3<<20)
	var nWrite, nPunch, nZero, nSync int
	for b := range batches {
		for range perBatch {
			off, n := fuseRandomRange(rng, size)
			switch r := rng.IntN(100); {
			case r < 70:
				p := buf[:n]
				fillRandom(rng, p)
				if k, err := f.WriteAt(p, off); err != nil || k != len(p) {
					t.Fatalf("batch %d: pwrite of %d bytes at %d: %d, %v\n%s", b, n, off, k, err, m.stderr)
				}
				copy(shadow[off:], p)
				nWrite++
			case r < 90:
				mode := unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE
				what := "punch-hole"
				if r >= 80 {
					mode, what = unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, "zero-range"
					nZero++
				} else {
					nPunch++
				}
				if err := unix.Fallocate(int(f.Fd()), uint32(mode), off, n); err != nil {
					t.Fatalf("batch %d: fallocate %s of %d bytes at %d: %v\n%s", b, what, n, off, err, m.stderr)
				}
				clear(shadow[off : off+n])
			default:
				if err := f.Sync(); err != nil {
					t.Fatalf("batch %d: fsync: %v", b, err)
				}
				nSync++
			}
		}
		if err := f.Sync(); err != nil {
			t.Fatalf("batch %d: fsync: %v", b, err)
		}
		if got := fuseReadFile(t, disk); !bytes.Equal(got, shadow) {
			t.Fatalf("batch %d: disk read through the page cache differs from the shadow at %s", b, firstDiff(got, shadow))
		}
		if got := fuseReadDirect(t, disk, size); !bytes.Equal(got, shadow) {
			t.Fatalf("batch %d: disk read with O_DIRECT differs from the shadow at %s", b, firstDiff(got, shadow))
		}
		if got := fuseQemuRaw(t, img, "-U"); !bytes.Equal(got, shadow) {
			t.Fatalf("batch %d: qemu-img convert -U after fsync differs from the shadow at %s", b, firstDiff(got, shadow))
		}
	}
	t.Logf("%d writes, %d punch-holes, %d zero-ranges, %d fsyncs", nWrite, nPunch, nZero, nSync)
	f.Close()
	m.cmd.Process.Signal(syscall.SIGTERM)
	if err := m.wait(t); err != nil {
		t.Fatalf("nbdgw mount after SIGTERM: %v\n%s", err, m.stderr)
	}
	if got := fuseQemuRaw(t, img); !bytes.Equal(got, shadow) {
		t.Errorf("qemu-img convert after unmount differs from the shadow at %s", firstDiff(got, shadow))
	}
	if kind != "raw" {
		fuseQemuCheck(t, img)
	}
	for _, f := range below {
		if got := fuseSHA(t, f); got != before[f] {
			t.Errorf("backing file %s changed: sha256 %s, was %s", f, got, before[f])
		}
	}
	if s := m.said(); s != "" {
		t.Errorf("nbdgw mount said:\n%s", s)
	}
}

// fuseRandomRange picks a range of the disk: small unaligned ones, medium
// ones, cluster-aligned runs of whole clusters, and ranges that end at the
// end of the disk.
func fuseRandomRange(rng *rand.Rand, size int64) (off, n int64) {
	switch rng.IntN(4) {
	case 0:
		n = 1 + rng.Int64N(8192)
	case 1:
		n = 1 + rng.Int64N(300<<10)
	case 2:
		n = (1 + rng.Int64N(32)) << 16
		return rng.Int64N((size-n)>>16+1) << 16, n
	default:
		n = 1 + rng.Int64N(2<<20)
		if rng.IntN(2) == 0 {
			return size - n, n
		}
	}
	off = rng.Int64N(size - n + 1)
	if rng.IntN(3) == 0 {
		off &^= 511
	}
	return off, n
}

func fillRandom(rng *rand.Rand, p []byte) {
	for i := 0; i < len(p); i += 8 {
		v := rng.Uint64()
		for j := i; j < min(i+8, len(p)); j++ {
			p[j] = byte(v)
			v >>= 8
		}
	}
}

func firstDiff(a, b []byte) string {
	if len(a) != len(b) {
		return fmt.Sprintf("length %d vs %d", len(a), len(b))
	}
	for i := range a {
		if a[i] != b[i] {
			return fmt.Sprintf("offset %d (%#x vs %#x)", i, a[i], b[i])
		}
	}
	return "nowhere"
}

// fuseQemuRaw is the guest content of an image as qemu-img convert reads it.
func fuseQemuRaw(t *testing.T, img string, flags ...string) []byte {
	t.Helper()
	raw := filepath.Join(t.TempDir(), "content.raw")
	runOutput(t, "qemu-img", append(append([]string{"convert"}, flags...), "-O", "raw", img, raw)...)
	b := fuseReadFile(t, raw)
	os.Remove(raw)
	return b
}

// fuseQemuCheck requires `qemu-img check` to exit 0 (no leaks, no
// corruption).
func fuseQemuCheck(t *testing.T, img string) {
	t.Helper()
	out, err := exec.Command("qemu-img", "check", img).CombinedOutput()
	if err != nil {
		t.Errorf("qemu-img check %s: %v\n%s", img, err, out)
	}
}

// fuseReadDirect reads a file with O_DIRECT, past the page cache, into an
// aligned buffer.
func fuseReadDirect(t *testing.T, path string, size int64) []byte {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const chunk = 1 << 20
	raw := make([]byte, chunk+4096)
	a := int(uintptr(unsafe.Pointer(&raw[0])) & 4095)
	if a != 0 {
		a = 4096 - a
	}
	p := raw[a : a+chunk]
	out := make([]byte, 0, size)
	for off := int64(0); off < size; off += chunk {
		n, err := f.ReadAt(p, off)
		if err != nil && !(err == io.EOF && off+int64(n) == size) {
			t.Fatalf("O_DIRECT read at %d: %d, %v", off, n, err)
		}
		out = append(out, p[:n]...)
	}
	return out
}

// fuseHeldMode is the access mode (O_RDONLY, O_WRONLY, O_RDWR) with which
// process pid holds path open, or -1.
func fuseHeldMode(t *testing.T, pid int, path string) int {
	t.Helper()
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, fd := range fds {
		if target, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name())); err != nil || target != path {
			continue
		}
		info, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%s", pid, fd.Name()))
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(info), "\n") {
			if v, ok := strings.CutPrefix(line, "flags:"); ok {
				flags, err := strconv.ParseUint(strings.TrimSpace(v), 8, 32)
				if err != nil {
					t.Fatal(err)
				}
				return int(flags & syscall.O_ACCMODE)
			}
		}
	}
	return -1
}

// fuseWriteSemantics checks the fixed-size file rules and what stays
// read-only, with dd and truncate and direct system calls.
func fuseWriteSemantics(t *testing.T, bin string) {
	fuseRequire(t, "dd", "truncate")
	dir := t.TempDir()
	img, below := fuseWriteImage(t, dir, "backing")
	shadow := fuseQemuRaw(t, img)
	size := int64(len(shadow))
	m := fuseStart(t, bin, img, "--writable")
	disk := filepath.Join(m.dir, "disk")

	// The top layer is open for writing, the backing file read-only.
	pid := m.cmd.Process.Pid
	if got := fuseHeldMode(t, pid, img); got != syscall.O_RDWR {
		t.Errorf("nbdgw holds %s with access mode %d, want O_RDWR", img, got)
	}
	for _, b := range below {
		if got := fuseHeldMode(t, pid, b); got != syscall.O_RDONLY {
			t.Errorf("nbdgw holds backing file %s with access mode %d, want O_RDONLY", b, got)
		}
	}

	fi, err := os.Stat(disk)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o644 || fi.Size() != size {
		t.Errorf("disk: mode %v size %d, want -rw-r--r-- and %d", fi.Mode(), fi.Size(), size)
	}
	blocksBefore := fi.Sys().(*syscall.Stat_t).Blocks

	// Read layer 1 and the base-allocation map once, so that stale
	// copies would show below.
	layer1 := filepath.Join(m.dir, "layers", "1", "disk")
	fuseReadFile(t, layer1)
	mapFile := filepath.Join(m.dir, "maps", "base-allocation")
	mapBefore := fuseReadFile(t, mapFile)

	// dd conv=notrunc writes; without it dd's O_TRUNC is refused before
	// anything is written.
	src := filepath.Join(dir, "src")
	data := bytes.Repeat([]byte("nbdgw dd "), 300000)[:2<<20+1234]
	if err := os.WriteFile(src, data, 0o644); err != nil {
		t.Fatal(err)
	}
	runOutput(t, "dd", "if="+src, "of="+disk, "bs=1M", "seek=5", "conv=notrunc,fsync", "status=none")
	copy(shadow[5<<20:], data)
	// Without conv=notrunc, dd opens with O_TRUNC when it does not seek:
	// refused before anything is written. With seek= it ftruncates to
	// the seek offset instead, which fails; GNU dd says so and writes.
	if out, err := exec.Command("dd", "if="+src, "of="+disk, "bs=1M", "status=none").CombinedOutput(); err == nil || !strings.Contains(string(out), "not permitted") {
		t.Errorf("dd without conv=notrunc: %v, %q; want a failure saying Operation not permitted", err, out)
	}
	out, err := exec.Command("dd", "if="+src, "of="+disk, "bs=1M", "seek=9", "status=none").CombinedOutput()
	if !strings.Contains(string(out), "failed to truncate") {
		t.Errorf("dd seek=9 without conv=notrunc: %v, %q; want it to say it failed to truncate", err, out)
	}
	copy(shadow[9<<20:], data)
	if out, err := exec.Command("cp", src, disk).CombinedOutput(); err == nil {
		t.Errorf("cp onto disk succeeded (%q); want EPERM (the size is fixed)", out)
	}
	// dd past the end: what fits is written, then ENOSPC, as on a block
	// device.
	out, err = exec.Command("dd", "if="+src, "of="+disk, "bs=1M", "seek=31", "conv=notrunc", "status=none").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "No space left on device") {
		t.Errorf("dd past the end: %v, %q; want No space left on device", err, out)
	}
	copy(shadow[31<<20:], data)

	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// One pwrite(2) each (os.File.WriteAt would retry the rest and hide
	// the short count).
	fd := int(f.Fd())
	if n, err := unix.Pwrite(fd, data[:8192], size-4096); n != 4096 || err != nil {
		t.Errorf("pwrite across the end: %d, %v; want 4096 (short)", n, err)
	}
	copy(shadow[size-4096:], data[:4096])
	if n, err := unix.Pwrite(fd, data[:1], size); !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("pwrite at the end: %d, %v; want ENOSPC", n, err)
	}

	fallocs := []struct {
		name      string
		mode      uint32
		off, n    int64
		want      error
		zeroRange bool
	}{
		{"allocate", 0, 0, size, nil, false},
		{"keep-size-past-end", unix.FALLOC_FL_KEEP_SIZE, size - 4096, 1 << 20, nil, false},
		{"allocate-past-end", 0, size - 4096, 1 << 20, syscall.EFBIG, false},
		{"zero-range-past-end", unix.FALLOC_FL_ZERO_RANGE, size - 4096, 1 << 20, syscall.EFBIG, false},
		{"collapse", unix.FALLOC_FL_COLLAPSE_RANGE, 0, 1 << 20, syscall.EOPNOTSUPP, false},
		{"punch-hole", unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE, 5<<20 + 100, 1 << 20, nil, true},
		{"zero-range", unix.FALLOC_FL_ZERO_RANGE, 20<<20 - 3, 2 << 20, nil, true},
		{"punch-past-end", unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE, size - 1000, 1 << 20, nil, true},
	}
	for _, tc := range fallocs {
		err := unix.Fallocate(fd, tc.mode, tc.off, tc.n)
		if !errors.Is(err, tc.want) && !(tc.want == nil && err == nil) {
			t.Errorf("fallocate %s: %v, want %v", tc.name, err, tc.want)
		}
		if err == nil && tc.zeroRange {
			clear(shadow[tc.off:min(size, tc.off+tc.n)])
		}
	}

	truncs := []struct {
		size int64
		want error
	}{
		{size, nil},
		{size - 1, syscall.EPERM},
		{size + 1, syscall.EPERM},
		{0, syscall.EPERM},
	}
	for _, tc := range truncs {
		if err := os.Truncate(disk, tc.size); !errors.Is(err, tc.want) && !(tc.want == nil && err == nil) {
			t.Errorf("truncate to %d: %v, want %v", tc.size, err, tc.want)
		}
	}
	if err := os.Chmod(disk, 0o600); !errors.Is(err, syscall.EPERM) {
		t.Errorf("chmod disk: %v, want EPERM", err)
	}
	for _, p := range []string{"info.json", "maps/base-allocation", "layers/1/disk", "layers/2/disk"} {
		f, err := os.OpenFile(filepath.Join(m.dir, p), os.O_RDWR, 0)
		if err == nil {
			f.Close()
			t.Errorf("%s opened read-write in a writable mount", p)
		} else if !errors.Is(err, syscall.EROFS) {
			t.Errorf("open %s O_RDWR: %v, want EROFS", p, err)
		}
	}
	if err := os.WriteFile(filepath.Join(m.dir, "new"), nil, 0o644); err == nil {
		t.Errorf("creating a file in a writable mount succeeded")
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}

	if got := fuseReadFile(t, disk); !bytes.Equal(got, shadow) {
		t.Errorf("disk differs from the shadow at %s", firstDiff(got, shadow))
	}
	if got := fuseQemuRaw(t, img, "-U"); !bytes.Equal(got, shadow) {
		t.Errorf("qemu-img convert -U after fsync differs from the shadow at %s", firstDiff(got, shadow))
	}
	// layers/1/disk shows the new top layer (no stale page cache).
	if got, want := fuseReadFile(t, layer1), fuseQemuRaw(t, fuseLayerSpec(img), "-U"); !bytes.Equal(got, want) {
		t.Errorf("layers/1/disk after writes differs from qemu-img convert of the top layer at %s", firstDiff(got, want))
	}
	// A fresh open of a map shows the writes: its holes are those of
	// nbdgw map in another process. (Only the HOLE bit is compared: the
	// ZERO bit of data clusters comes from the host file's holes, which
	// the engine, as QEMU, consults only when its once-per-open
	// metadata-preallocation test said so.)
	mapAfter := fuseReadFile(t, mapFile)
	want := runOutput(t, bin, "map", "-U", "--context", "base:allocation", img) // -U as qemu-img: the mount holds the write lock
	if got, want := fuseHoles(t, mapAfter), fuseHoles(t, want); got != want {
		t.Errorf("maps/base-allocation after writes has holes %s\nnbdgw map --context base:allocation: %s", got, want)
	}
	if fuseHoles(t, mapAfter) == fuseHoles(t, mapBefore) {
		t.Errorf("maps/base-allocation did not change with the writes:\n%s", mapAfter)
	}
	// st_blocks follows (within a second or two: it is recomputed at
	// most once a second, and attributes are cached for a second).
	blocksAfter := blocksBefore
	for i := 0; i < 40 && blocksAfter == blocksBefore; i++ {
		time.Sleep(100 * time.Millisecond)
		if fi, err = os.Stat(disk); err != nil {
			t.Fatal(err)
		}
		blocksAfter = fi.Sys().(*syscall.Stat_t).Blocks
	}
	if blocksAfter == blocksBefore {
		t.Errorf("st_blocks still %d 4s after writes and punched holes", blocksAfter)
	}
	f.Close()
	runOutput(t, "fusermount3", "-u", m.dir)
	if err := m.wait(t); err != nil {
		t.Fatalf("nbdgw mount after fusermount3 -u: %v\n%s", err, m.stderr)
	}
	if got := fuseQemuRaw(t, img); !bytes.Equal(got, shadow) {
		t.Errorf("qemu-img convert after unmount differs from the shadow at %s", firstDiff(got, shadow))
	}
	fuseQemuCheck(t, img)
}

// fuseHoles lists the coalesced hole ranges of a base:allocation map in
// nbdinfo --map text form.
func fuseHoles(t *testing.T, text []byte) string {
	t.Helper()
	var b strings.Builder
	end := int64(-1)
	for _, line := range strings.Split(strings.TrimSpace(string(text)), "\n") {
		f := strings.Fields(line)
		if len(f) < 3 {
			t.Fatalf("map line %q", line)
		}
		off, err1 := strconv.ParseInt(f[0], 10, 64)
		n, err2 := strconv.ParseInt(f[1], 10, 64)
		flags, err3 := strconv.ParseUint(f[2], 10, 32)
		if err1 != nil || err2 != nil || err3 != nil {
			t.Fatalf("map line %q", line)
		}
		if flags&1 == 0 {
			continue
		}
		if off == end {
			end += n
			continue
		}
		if end >= 0 {
			fmt.Fprintf(&b, "%d) ", end)
		}
		fmt.Fprintf(&b, "[%d, ", off)
		end = off + n
	}
	if end >= 0 {
		fmt.Fprintf(&b, "%d)", end)
	}
	return b.String()
}

// qemuMapEntry is one entry of `qemu-img map --output=json`.
type qemuMapEntry struct {
	Start  int64 `json:"start"`
	Length int64 `json:"length"`
	Data   bool  `json:"data"`
	Zero   bool  `json:"zero"`
}

// fuseWritePunchHole: util-linux `fallocate --punch-hole` (and
// --zero-range) on the mounted disk; the ranges read as zeroes, and both
// `nbdgw map` and `qemu-img map` then report the punched clusters as zero
// and not data.
func fuseWritePunchHole(t *testing.T, bin string) {
	fuseRequire(t, "fallocate")
	for _, kind := range []string{"standalone", "backing"} {
		t.Run(kind, func(t *testing.T) {
			dir := t.TempDir()
			img := filepath.Join(dir, "img.qcow2")
			if kind == "backing" {
				base := filepath.Join(dir, "base.qcow2")
				runOutput(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "16M")
				runOutput(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x55 0 16M", base)
				runOutput(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", img)
				runOutput(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x66 0 8M", img)
			} else {
				runOutput(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "16M")
				runOutput(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x55 0 16M", img)
			}
			shadow := fuseQemuRaw(t, img)
			m := fuseStart(t, bin, img, "--writable")
			disk := filepath.Join(m.dir, "disk")
			fuseReadFile(t, disk) // fill the page cache: punched pages must go
			ranges := []struct {
				flag   string
				off, n int64
				whole  bool // whole clusters: must stop being data
			}{
				{"--punch-hole", 1 << 20, 3 << 20, true},
				{"--punch-hole", 5<<20 + 5000, 300000, false},
				{"--punch-hole", 10 << 20, 1 << 20, true},
				{"--zero-range", 12<<20 + 7, 100000, false},
			}
			for _, r := range ranges {
				runOutput(t, "fallocate", r.flag, "--offset", strconv.FormatInt(r.off, 10), "--length", strconv.FormatInt(r.n, 10), disk)
				clear(shadow[r.off : r.off+r.n])
			}
			if got := fuseReadFile(t, disk); !bytes.Equal(got, shadow) {
				t.Errorf("disk after fallocate differs from the expected content at %s", firstDiff(got, shadow))
			}
			// fallocate(1) closes the disk, which flushes the image:
			// other readers see the result now.
			var qmap, gmap []qemuMapEntry
			if err := json.Unmarshal(runOutput(t, "qemu-img", "map", "-U", "--output=json", img), &qmap); err != nil {
				t.Fatal(err)
			}
			if err := json.Unmarshal(runOutput(t, bin, "map", "-U", "--output=json", img), &gmap); err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(qmap) != fmt.Sprint(gmap) {
				t.Errorf("nbdgw map --output=json %v\nqemu-img map --output=json %v", gmap, qmap)
			}
			for _, r := range ranges {
				if !r.whole {
					continue
				}
				for _, e := range qmap {
					if e.Start < r.off+r.n && r.off < e.Start+e.Length && (e.Data || !e.Zero) {
						t.Errorf("after %s of [%d, +%d): qemu-img map has %+v", r.flag, r.off, r.n, e)
					}
				}
			}
			runOutput(t, "fusermount3", "-u", m.dir)
			if err := m.wait(t); err != nil {
				t.Fatalf("nbdgw mount after fusermount3 -u: %v\n%s", err, m.stderr)
			}
			if got := fuseQemuRaw(t, img); !bytes.Equal(got, shadow) {
				t.Errorf("qemu-img convert after unmount differs at %s", firstDiff(got, shadow))
			}
			fuseQemuCheck(t, img)
		})
	}
}

// fuseWriteMkfs: mkfs.ext4 straight onto the writable disk, a loop mount
// of it (from this process, never from nbdgw's), a file written into the
// file system; after unmounting, qemu-img check passes, e2fsck finds the
// file system clean, and a fresh read-only mount shows the file.
func fuseWriteMkfs(t *testing.T, bin string) {
	fuseRequire(t, "mkfs.ext4", "e2fsck", "mount", "umount")
	if os.Geteuid() != 0 {
		t.Skip("loop-mounting needs root")
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "fs.qcow2")
	runOutput(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "64M")
	m := fuseStart(t, bin, img, "--writable")
	disk := filepath.Join(m.dir, "disk")
	runOutput(t, "mkfs.ext4", "-q", "-F", disk)
	mnt := filepath.Join(dir, "ext4")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-o", "loop", "-t", "ext4", disk, mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount -o loop of the disk nbdgw wrote: %v\n%s", err, out)
	}
	content := make([]byte, 3<<20+17)
	fillRandom(rand.New(rand.NewPCG(1, 2)), content)
	werr := os.WriteFile(filepath.Join(mnt, "hello.bin"), content, 0o644)
	if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
		t.Fatalf("umount: %v\n%s", err, out)
	}
	if werr != nil {
		t.Fatal(werr)
	}
	m.cmd.Process.Signal(syscall.SIGINT)
	if err := m.wait(t); err != nil {
		t.Fatalf("nbdgw mount after SIGINT: %v\n%s", err, m.stderr)
	}
	fuseQemuCheck(t, img)
	raw := filepath.Join(dir, "fs.raw")
	runOutput(t, "qemu-img", "convert", "-O", "raw", img, raw)
	if out, err := exec.Command("e2fsck", "-fn", raw).CombinedOutput(); err != nil {
		t.Errorf("e2fsck -fn of the written file system: %v\n%s", err, out)
	}

	m = fuseStart(t, bin, img)
	if out, err := exec.Command("mount", "-o", "ro,loop", "-t", "ext4", filepath.Join(m.dir, "disk"), mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount -o ro,loop of the read-only disk: %v\n%s", err, out)
	}
	got, err := os.ReadFile(filepath.Join(mnt, "hello.bin"))
	if out, uerr := exec.Command("umount", mnt).CombinedOutput(); uerr != nil {
		t.Errorf("umount: %v\n%s", uerr, out)
	}
	if err != nil || !bytes.Equal(got, content) {
		t.Errorf("hello.bin through a read-only mount: %d bytes, %v; want the %d bytes written", len(got), err, len(content))
	}
}
