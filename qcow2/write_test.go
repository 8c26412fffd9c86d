package qcow2

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// writeCase is an image to write to, built with QEMU's tools.
type writeCase struct {
	name  string
	build func(t *testing.T, d string) string
	// discardZeroes: discarded whole clusters read as zero (qcow2 v3);
	// otherwise they show the backing file (v2) or, for raw, the exact
	// byte range reads as zero.
	v2, raw bool
}

var writeCases = []writeCase{
	{name: "backing-chain", build: func(t *testing.T, d string) string {
		mustRun(t, d, "qemu-img", "create", "-f", "raw", "b.raw", "6M")
		mustRun(t, d, "qemu-io", "-f", "raw", "-c", "w -P 0x5a 0 6M", "b.raw")
		mustRun(t, d, "qemu-img", "create", "-f", "qcow2", "-b", "b.raw", "-F", "raw", "a.qcow2")
		mustRun(t, d, "qemu-io", "-f", "qcow2", "-c", "w -P 1 1M 100k", "-c", "w -z 3M 64k", "a.qcow2")
		return "a.qcow2"
	}},
	{name: "compressed", build: func(t *testing.T, d string) string {
		mustRun(t, d, "qemu-img", "create", "-f", "raw", "s.raw", "5M")
		mustRun(t, d, "qemu-io", "-f", "raw", "-c", "w -P 0x33 0 3M", "-c", "w -P 0x44 4M 512k", "s.raw")
		mustRun(t, d, "qemu-img", "convert", "-c", "-O", "qcow2", "s.raw", "a.qcow2")
		return "a.qcow2"
	}},
	{name: "extended-l2-backing", build: func(t *testing.T, d string) string {
		mustRun(t, d, "qemu-img", "create", "-f", "qcow2", "b.qcow2", "4M")
		mustRun(t, d, "qemu-io", "-f", "qcow2", "-c", "w -P 0x77 0 4M", "b.qcow2")
		mustRun(t, d, "qemu-img", "create", "-f", "qcow2", "-o", "extended_l2=on", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2")
		mustRun(t, d, "qemu-io", "-f", "qcow2", "-c", "w -P 2 6k 10k", "a.qcow2")
		return "a.qcow2"
	}},
	{name: "small-clusters-grow-refcounts", build: func(t *testing.T, d string) string {
		// 512-byte clusters: every few writes need a new refcount block,
		// and the refcount table must move.
		mustRun(t, d, "qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", "a.qcow2", "3M")
		return "a.qcow2"
	}},
	{name: "persistent-bitmaps", build: func(t *testing.T, d string) string {
		mustRun(t, d, "qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=16k", "a.qcow2", "4M")
		mustRun(t, d, "qemu-img", "bitmap", "--add", "-g", "16k", "a.qcow2", "b0")
		mustRun(t, d, "qemu-io", "-f", "qcow2", "-c", "w -P 4 0 1M", "a.qcow2")
		return "a.qcow2"
	}},
	{name: "v2", v2: true, build: func(t *testing.T, d string) string {
		mustRun(t, d, "qemu-img", "create", "-f", "raw", "b.raw", "2M")
		mustRun(t, d, "qemu-io", "-f", "raw", "-c", "w -P 0x21 0 2M", "b.raw")
		mustRun(t, d, "qemu-img", "create", "-f", "qcow2", "-o", "compat=0.10", "-b", "b.raw", "-F", "raw", "a.qcow2")
		return "a.qcow2"
	}},
	{name: "raw", raw: true, build: func(t *testing.T, d string) string {
		mustRun(t, d, "qemu-img", "create", "-f", "raw", "a.raw", "3M")
		mustRun(t, d, "qemu-io", "-f", "raw", "-c", "w -P 9 0 1M", "a.raw")
		return "a.raw"
	}},
}

func fileSums(t *testing.T, files ...string) [][32]byte {
	var out [][32]byte
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, sha256.Sum256(b))
	}
	return out
}

const debugWrites = false

// TestRandomWrites runs seeded random writes, zero writes, discards and
// flushes against a shadow copy; after every batch the image must read back
// as the shadow through the engine AND through qemu-img convert, and
// qemu-img check must find nothing wrong. Backing files must not change.
func TestRandomWrites(t *testing.T) {
	for _, tool := range []string{"qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed", tool)
		}
	}
	ops, batches := 300, 6
	if testing.Short() {
		ops, batches = 100, 3
	}
	for _, c := range writeCases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			d := t.TempDir()
			name := filepath.Join(d, c.build(t, d))
			backing, _ := filepath.Glob(filepath.Join(d, "b.*"))
			before := fileSums(t, backing...)
			im, err := Open(name, Options{Writable: true, Warn: func(s string) { t.Log(s) }})
			if err != nil {
				t.Fatal(err)
			}
			defer func() {
				if im != nil {
					im.Close()
				}
			}()
			size := im.Size()
			shadow := make([]byte, size)
			if _, err := im.ReadAt(shadow, 0); err != nil {
				t.Fatal(err)
			}
			below := make([]byte, size) // what the backing chain shows
			if len(im.layers) > 1 {
				if err := im.readBelow(0, below, 0); err != nil {
					t.Fatal(err)
				}
			}
			cs := int64(512)
			if q, ok := im.layers[0].(*qcow2Layer); ok {
				cs = q.csize
			}
			rng := rand.New(rand.NewSource(int64(len(c.name))))
			randRange := func() (int64, int64) {
				n := rng.Int63n(3*cs) + 1
				if rng.Intn(4) == 0 {
					n = rng.Int63n(300<<10) + 1
				}
				off := rng.Int63n(size)
				if rng.Intn(2) == 0 {
					off &^= 511
				}
				return off, min(n, size-off)
			}
			for b := 0; b < batches; b++ {
				for i := 0; i < ops; i++ {
					off, n := randRange()
					r := rng.Intn(10)
					if debugWrites {
						t.Logf("op %d: kind %d off %d n %d", i, r, off, n)
					}
					switch {
					case r < 6:
						p := make([]byte, n)
						rng.Read(p)
						if _, err := im.WriteAt(p, off); err != nil {
							t.Fatalf("WriteAt(%d, %d): %v", off, n, err)
						}
						copy(shadow[off:], p)
					case r < 8:
						f := ZeroFlags(rng.Intn(2)) // maybe ZeroMayUnmap
						if err := im.WriteZeroes(off, n, f); err != nil {
							t.Fatalf("WriteZeroes(%d, %d, %d): %v", off, n, f, err)
						}
						clear(shadow[off : off+n])
					case r < 9:
						if err := im.Discard(off, n); err != nil {
							t.Fatalf("Discard(%d, %d): %v", off, n, err)
						}
						discardModel(shadow, below, off, n, cs, c)
					default:
						if err := im.Flush(); err != nil {
							t.Fatal(err)
						}
					}
					if debugWrites {
						got := make([]byte, size)
						im.ReadAt(got, 0)
						if j := firstDiff(got, shadow); j >= 0 {
							t.Fatalf("op %d (%d, %d): differs at %d: %d vs %d", i, off, n, j, got[j], shadow[j])
						}
					}
				}
				if err := im.Flush(); err != nil {
					t.Fatal(err)
				}
				got := make([]byte, size)
				if _, err := im.ReadAt(got, 0); err != nil {
					t.Fatal(err)
				}
				if i := firstDiff(got, shadow); i >= 0 {
					t.Fatalf("batch %d: engine reads differ from shadow at %d", b, i)
				}
				checkWithQEMU(t, d, name, shadow, c.raw)
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			im = nil
			checkWithQEMU(t, d, name, shadow, c.raw)
			if after := fileSums(t, backing...); !equalSums(before, after) {
				t.Errorf("a backing file changed")
			}
		})
	}
}

func equalSums(a, b [][32]byte) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// discardModel is what Discard does to the guest view: qcow2 releases whole
// clusters (and the partial last one), which then read as zero (v3) or show
// the backing chain (v2); raw punches exactly the range.
func discardModel(shadow, below []byte, off, n, cs int64, c writeCase) {
	if c.raw {
		clear(shadow[off : off+n])
		return
	}
	size := int64(len(shadow))
	lo := (off + cs - 1) &^ (cs - 1)
	hi := (off + n) &^ (cs - 1)
	if off+n == size {
		hi = size
	}
	for ; lo < hi; lo += cs {
		e := min(lo+cs, size)
		if c.v2 {
			copy(shadow[lo:e], below[lo:e])
		} else {
			clear(shadow[lo:e])
		}
	}
}

func checkWithQEMU(t *testing.T, d, name string, shadow []byte, raw bool) {
	t.Helper()
	if !raw {
		// -U: the image may still be open writable here, locked as
		// QEMU locks it; it was flushed, so its state is consistent.
		cmd := exec.Command("qemu-img", "check", "-U", name)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("qemu-img check: %v\n%s", err, out)
		}
	}
	out := filepath.Join(d, "converted.raw")
	if o, err := exec.Command("qemu-img", "convert", "-U", "-O", "raw", name, out).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert: %v\n%s", err, o)
	}
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, shadow) {
		t.Fatalf("qemu-img convert differs from shadow at %d", firstDiff(got, shadow))
	}
}

// TestReadOnlyRefusesWrites: without Writable every write fails and no
// file is opened for writing.
func TestReadOnlyRefusesWrites(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img not installed")
	}
	d := t.TempDir()
	f := filepath.Join(d, "a.qcow2")
	mustRun(t, d, "qemu-img", "create", "-f", "qcow2", f, "1M")
	before := fileSums(t, f)
	im, err := Open(f, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := im.WriteAt([]byte{1}, 0); !errors.Is(err, ErrReadOnly) {
		t.Errorf("WriteAt: %v, want ErrReadOnly", err)
	}
	if err := im.WriteZeroes(0, 512, 0); !errors.Is(err, ErrReadOnly) {
		t.Errorf("WriteZeroes: %v", err)
	}
	if err := im.Discard(0, 512); !errors.Is(err, ErrReadOnly) {
		t.Errorf("Discard: %v", err)
	}
	for _, l := range im.layers {
		var h *hostFile
		switch v := l.(type) {
		case *qcow2Layer:
			h = v.h
		case *rawLayer:
			h = v.h
		}
		fl, _ := fcntlFlags(h)
		if fl&(os.O_WRONLY|os.O_RDWR) != 0 {
			t.Errorf("%s opened for writing", h.name)
		}
	}
	im.Close()
	if !equalSums(before, fileSums(t, f)) {
		t.Errorf("image changed")
	}
}

// TestSnapshotLeavesChainUntouched: --snapshot writes go to a throwaway
// overlay.
func TestSnapshotLeavesChainUntouched(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img not installed")
	}
	d := t.TempDir()
	f := filepath.Join(d, "a.qcow2")
	mustRun(t, d, "qemu-img", "create", "-f", "qcow2", f, "1M")
	mustRun(t, d, "qemu-io", "-f", "qcow2", "-c", "w -P 3 0 64k", f)
	before := fileSums(t, f)
	im, err := Open(f, Options{Snapshot: true})
	if err != nil {
		t.Fatal(err)
	}
	p := bytes.Repeat([]byte{7}, 100000)
	if _, err := im.WriteAt(p, 1000); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 102000)
	im.ReadAt(got, 0)
	if got[999] != 3 || got[1000] != 7 || got[100999] != 7 || got[101000] != 0 {
		t.Errorf("snapshot reads back %d %d %d %d", got[999], got[1000], got[100999], got[101000])
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	if !equalSums(before, fileSums(t, f)) {
		t.Errorf("image changed under --snapshot")
	}
}
