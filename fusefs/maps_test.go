package fusefs

import (
	"bytes"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/nbdgw/nbdgw/metactx"
	"github.com/nbdgw/nbdgw/qcow2"
)

// readAll reads a cursor to the end with reads of the given size, as the
// kernel does for `cat` on a direct-I/O file, checking that the cursor
// never holds much more than one read.
func readAll(t *testing.T, c *mapCursor, size int) []byte {
	t.Helper()
	var out []byte
	p := make([]byte, size)
	for {
		n, err := c.readAt(p, int64(len(out)))
		if err != nil {
			t.Fatal(err)
		}
		if len(c.buf) > size+mapChunk+512 {
			t.Fatalf("cursor holds %d bytes for reads of %d", len(c.buf), size)
		}
		if n == 0 {
			return out
		}
		out = append(out, p[:n]...)
	}
}

// TestMapCursorStreaming runs a map of 300000 extents through reads of
// several sizes, re-reads from 0 and random offsets, against the whole
// output built in one go with the same metactx line formats.
func TestMapCursorStreaming(t *testing.T) {
	const (
		runs   = 300000
		runLen = 4096
	)
	// Adjacent runs differ in flags, so they are the maximal runs a
	// coalescing walk delivers; the walk resumes at any run boundary.
	walk := func(off int64, fn func(off, length int64, flags uint32) error) error {
		for i := off / runLen; i < runs; i++ {
			if err := fn(i*runLen, runLen, uint32(i%3)); err != nil {
				return err
			}
		}
		return nil
	}
	for _, json := range []bool{false, true} {
		var want []byte
		if json {
			want = append(want, metactx.JSONOpen...)
		}
		for i := int64(0); i < runs; i++ {
			if json {
				if i > 0 {
					want = append(want, metactx.JSONSep...)
				}
				want = metactx.AppendJSON(want, metactx.BaseAllocation, i*runLen, runLen, uint32(i%3))
			} else {
				want = metactx.AppendText(want, metactx.BaseAllocation, i*runLen, runLen, uint32(i%3))
			}
		}
		if json {
			want = append(want, metactx.JSONClose...)
		}
		c := newMapCursor(metactx.BaseAllocation, json, walk)
		for _, size := range []int{131072, 4096, 1 << 20, 4093} {
			if got := readAll(t, c, size); !bytes.Equal(got, want) {
				t.Fatalf("json=%v reads of %d: %d bytes differ from the %d expected", json, size, len(got), len(want))
			}
		}
		// Random offsets, forwards and backwards.
		rng := rand.New(rand.NewPCG(1, 2))
		p := make([]byte, 1000)
		for range 50 {
			off := rng.Int64N(int64(len(want)) + 10)
			n, err := c.readAt(p, off)
			if err != nil {
				t.Fatal(err)
			}
			end := min(off+int64(len(p)), int64(len(want)))
			if off >= end {
				if n != 0 {
					t.Fatalf("read at %d past the end returned %d bytes", off, n)
				}
				continue
			}
			if !bytes.Equal(p[:n], want[off:end]) {
				t.Fatalf("read at %d: wrong bytes", off)
			}
		}
	}
}

// TestMapCursorMatchesWriteMap compares the cursor with metactx.WriteMap
// (what `nbdgw map --context` prints) on real images built by qemu-img:
// a sparse raw file of 4096 extents and a qcow2 over it.
func TestMapCursorMatchesWriteMap(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skipf("qemu-img not installed: %v", err)
	}
	dir := t.TempDir()
	raw := filepath.Join(dir, "sparse.raw")
	f, err := os.Create(raw)
	if err != nil {
		t.Fatal(err)
	}
	block := bytes.Repeat([]byte{0xa5}, 4096)
	for i := int64(0); i < 4096; i += 2 {
		if _, err := f.WriteAt(block, i*8192); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Truncate(4096 * 8192); err != nil {
		t.Fatal(err)
	}
	f.Close()
	qc := filepath.Join(dir, "top.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", raw, "-F", "raw", qc)
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64k", "-c", "write -z 1M 64k", "-c", "write -P 2 3M 12k", qc)
	for _, path := range []string{raw, qc} {
		img, err := qcow2.Open(path, qcow2.Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer img.Close()
		for _, name := range metactx.Names(img) {
			for _, json := range []bool{false, true} {
				var want bytes.Buffer
				if err := metactx.WriteMap(&want, img, name, json); err != nil {
					t.Fatal(err)
				}
				c := newMapCursor(name, json, func(off int64, fn func(off, length int64, flags uint32) error) error {
					return metactx.Walk(img, name, off, img.Size()-off, fn)
				})
				for _, size := range []int{4096, 131072} {
					if got := readAll(t, c, size); !bytes.Equal(got, want.Bytes()) {
						t.Errorf("%s %s json=%v reads of %d: got %d bytes, WriteMap wrote %d", filepath.Base(path), name, json, size, len(got), want.Len())
					}
				}
			}
		}
	}
}

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
}

func TestMapFileName(t *testing.T) {
	tests := []struct {
		name string
		json bool
		want string
		ok   bool
	}{
		{metactx.BaseAllocation, false, "base-allocation", true},
		{metactx.AllocationDepth, true, "allocation-depth.json", true},
		{metactx.JointAllocation, false, "joint-allocation", true},
		{metactx.DirtyBitmapPrefix + "b0", false, "dirty-bitmap-b0", true},
		{metactx.DirtyBitmapPrefix + "a/b%c\x00", true, "dirty-bitmap-a%2Fb%25c%00.json", true},
		{metactx.DirtyBitmapPrefix + string(bytes.Repeat([]byte{'x'}, 243)), false, "dirty-bitmap-" + string(bytes.Repeat([]byte{'x'}, 243)), false},
	}
	for _, tc := range tests {
		got, ok := mapFileName(tc.name, tc.json)
		if ok != tc.ok || (ok && got != tc.want) {
			t.Errorf("mapFileName(%q, %v) = %q, %v; want %q, %v", tc.name, tc.json, got, ok, tc.want, tc.ok)
		}
	}
}
