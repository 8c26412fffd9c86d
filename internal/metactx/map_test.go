package metactx

import (
	"bytes"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/nbdgw/nbdgw/qcow2"
)

// readAll reads a cursor to the end with reads of the given size, as the
// kernel does for `cat` on a direct-I/O file, checking that the cursor
// never holds much more than one read.
func readAll(t *testing.T, c *Map, size int) []byte {
	t.Helper()
	var out []byte
	p := make([]byte, size)
	for {
		n, err := c.ReadAt(p, int64(len(out)))
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

// TestMapStreaming runs a map of 300000 extents through reads of
// several sizes, re-reads from 0 and random offsets, against the whole
// output built in one go with the same metactx line formats.
func TestMapStreaming(t *testing.T) {
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
			want = append(want, "[\n"...)
		}
		for i := int64(0); i < runs; i++ {
			if json {
				if i > 0 {
					want = append(want, ",\n"...)
				}
				want = appendJSON(want, BaseAllocation, i*runLen, runLen, uint32(i%3))
			} else {
				want = AppendText(want, BaseAllocation, i*runLen, runLen, uint32(i%3))
			}
		}
		if json {
			want = append(want, "\n]\n"...)
		}
		c := NewMap(BaseAllocation, Format{JSON: json}, runs*runLen, walk)
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
			n, err := c.ReadAt(p, off)
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

// TestMapCursorMatchesWriteMap compares the cursor with WriteMap
// (what `nbdgw map --context` prints) on real images built by qemu-img:
// a sparse raw file of 4096 extents and a qcow2 over it.
func TestMapReadAtMatchesWriteMap(t *testing.T) {
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
	runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", raw, "-F", "raw", qc)
	runTool(t, "qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64k", "-c", "write -z 1M 64k", "-c", "write -P 2 3M 12k", qc)
	for _, path := range []string{raw, qc} {
		img, err := qcow2.Open(path, qcow2.Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer img.Close()
		for _, name := range Names(img) {
			for _, json := range []bool{false, true} {
				var want bytes.Buffer
				if err := WriteMap(&want, img, name, json); err != nil {
					t.Fatal(err)
				}
				c := NewMap(name, Format{JSON: json}, img.Size(), ImageSource(img, name))
				for _, size := range []int{4096, 131072} {
					if got := readAll(t, c, size); !bytes.Equal(got, want.Bytes()) {
						t.Errorf("%s %s json=%v reads of %d: got %d bytes, WriteMap wrote %d", filepath.Base(path), name, json, size, len(got), want.Len())
					}
				}
			}
		}
	}
}

func runTool(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
}

// TestDescription pins the descriptions: nbdinfo's words for the contexts
// it knows (TestTotalsMatchNbdinfo and the integration tests compare them
// with nbdinfo itself) and the documented spelling of
// qemu:joint-allocation: where the bytes come from, then base:allocation's
// word.
func TestDescription(t *testing.T) {
	joint := []string{
		"absent,data", "absent,hole", "absent,zero", "absent,hole,zero",
		"local,data", "local,hole", "local,zero", "local,hole,zero",
		"backing,data", "backing,hole", "backing,zero", "backing,hole,zero",
		"local,backing,data", "local,backing,hole", "local,backing,zero", "local,backing,hole,zero",
	}
	for f, want := range joint {
		if got := Description(JointAllocation, uint32(f)); got != want {
			t.Errorf("Description(joint, %d) = %q, want %q", f, got, want)
		}
	}
	for _, tc := range []struct {
		name  string
		flags uint32
		want  string
	}{
		{JointAllocation, 16, ""},
		{BaseAllocation, 0, "data"}, {BaseAllocation, 3, "hole,zero"}, {BaseAllocation, 4, ""},
		{AllocationDepth, 0, "absent"}, {AllocationDepth, 1, "local"}, {AllocationDepth, 7, "backing depth 7"},
		{DirtyBitmapPrefix + "b", 0, "clean"}, {DirtyBitmapPrefix + "b", 1, "dirty"}, {DirtyBitmapPrefix + "b", 2, ""},
		{"x:y", 0, ""},
	} {
		if got := Description(tc.name, tc.flags); got != tc.want {
			t.Errorf("Description(%s, %d) = %q, want %q", tc.name, tc.flags, got, tc.want)
		}
	}
}

// TestTotalsMatchNbdinfo: --totals of an image whose shares are not round
// numbers (sevenths: C's %g and %5.1f) is what nbdinfo --map --totals
// prints over qemu-nbd, for text and JSON, and so is the map itself.
func TestTotalsMatchNbdinfo(t *testing.T) {
	for _, tool := range []string{"qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is installed by scripts/install-deps.sh: %v", tool, err)
		}
	}
	dir := t.TempDir()
	base, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	const seventh = 3 * 65536
	runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", base, strconv.Itoa(7*seventh))
	runTool(t, "qemu-io", "-f", "qcow2", "-c", "write -P 1 0 "+strconv.Itoa(3*seventh), base)
	runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
	runTool(t, "qemu-io", "-f", "qcow2", "-c", "write -P 2 "+strconv.Itoa(seventh)+" "+strconv.Itoa(seventh),
		"-c", "write -z "+strconv.Itoa(5*seventh)+" "+strconv.Itoa(seventh), top)
	runTool(t, "qemu-img", "bitmap", "--add", top, "b0")
	runTool(t, "qemu-io", "-f", "qcow2", "-c", "write -P 3 "+strconv.Itoa(6*seventh)+" 65536", top)
	img, err := qcow2.Open(top, qcow2.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	for _, name := range []string{BaseAllocation, AllocationDepth, DirtyBitmapPrefix + "b0"} {
		for _, f := range []Format{{}, {JSON: true}, {Totals: true}, {Totals: true, JSON: true}} {
			args := []string{"--map=" + name}
			if f.JSON {
				args = append(args, "--json")
			}
			if f.Totals {
				args = append(args, "--totals")
			}
			args = append(args, "--", "[", "qemu-nbd", "-r", "-A", "-B", "b0", "-f", "qcow2", top, "]")
			want, err := exec.Command("nbdinfo", args...).Output()
			if err != nil {
				t.Fatalf("nbdinfo %v: %v", args, err)
			}
			var got bytes.Buffer
			if _, err := NewMap(name, f, img.Size(), ImageSource(img, name)).WriteTo(&got); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got.Bytes(), want) {
				t.Errorf("%s %+v:\n%s\nnbdinfo %v:\n%s", name, f, got.Bytes(), args, want)
			}
		}
	}
}
