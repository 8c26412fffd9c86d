package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// Corrupt images: valid images made by qemu-img, then one structure broken
// on purpose. Every one must give an error that names the problem and where
// it is, never a panic or a wrong answer.

func mustRun(t *testing.T, dir, name string, args ...string) {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
}

// header reads the header of a file made by qemu-img.
func header(t *testing.T, file string) (*Header, []byte) {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	h, err := ParseHeader(file, b[:min(len(b), 2<<20)], int64(len(b)))
	if err != nil {
		t.Fatal(err)
	}
	return h, b
}

func put64(t *testing.T, file string, off int64, v uint64) {
	t.Helper()
	f, err := os.OpenFile(file, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	if _, err := f.WriteAt(b[:], off); err != nil {
		t.Fatal(err)
	}
}

func get64(b []byte, off uint64) uint64 { return binary.BigEndian.Uint64(b[off:]) }

// useImage opens name and exercises it fully; it returns the first error.
func useImage(name string, opts Options) error {
	opts.Warn = func(string) {}
	im, err := Open(name, opts)
	if err != nil {
		return err
	}
	defer im.Close()
	if err := im.BlockStatus(0, im.Size(), func(Extent) error { return nil }); err != nil {
		return err
	}
	p := make([]byte, 1<<20)
	for off := int64(0); off < im.Size(); off += int64(len(p)) {
		if _, err := im.ReadAt(p[:min(int64(len(p)), im.Size()-off)], off); err != nil {
			return err
		}
	}
	return nil
}

func TestCorruptImages(t *testing.T) {
	for _, tool := range []string{"qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed", tool)
		}
	}
	type tc struct {
		name  string
		setup func(t *testing.T, dir string) string // returns the image to open
		is    error                                 // sentinel the error must wrap
		want  []string                              // substrings of the message
	}
	base := func(t *testing.T, dir string, opts ...string) string {
		f := filepath.Join(dir, "a.qcow2")
		args := []string{"create", "-f", "qcow2"}
		if len(opts) > 0 {
			args = append(args, "-o", strings.Join(opts, ","))
		}
		mustRun(t, dir, "qemu-img", append(args, f, "4M")...)
		mustRun(t, dir, "qemu-io", "-f", "qcow2", "-c", "w -P 1 0 128k", "-c", "w -P 2 1M 64k", f)
		return f
	}
	compressed := func(t *testing.T, dir string) (string, uint64) {
		raw, f := filepath.Join(dir, "s.raw"), filepath.Join(dir, "a.qcow2")
		mustRun(t, dir, "qemu-img", "create", "-f", "raw", raw, "1M")
		mustRun(t, dir, "qemu-io", "-f", "raw", "-c", "w -P 3 0 1M", raw)
		mustRun(t, dir, "qemu-img", "convert", "-c", "-O", "qcow2", raw, f)
		h, b := header(t, f)
		l2 := get64(b, h.L1TableOffset) & l1eOffsetMask
		return f, l2
	}
	cases := []tc{
		{"truncated-header", func(t *testing.T, d string) string {
			f := base(t, d)
			os.Truncate(f, 50)
			return f
		}, ErrCorrupt, []string{"truncated header"}},
		{"bad-magic-forced-qcow2", func(t *testing.T, d string) string {
			f := base(t, d)
			put64(t, f, 0, 0x1234567800000003)
			return f
		}, ErrNotQcow2, []string{"magic"}},
		{"l1-table-past-eof", func(t *testing.T, d string) string {
			f := base(t, d)
			put64(t, f, 40, 1<<40)
			return f
		}, ErrCorrupt, []string{"L1 table", "past end of file"}},
		{"l1-table-unaligned", func(t *testing.T, d string) string {
			f := base(t, d)
			h, _ := header(t, f)
			put64(t, f, 40, h.L1TableOffset+8)
			return f
		}, ErrCorrupt, []string{"L1 table offset", "not aligned"}},
		{"huge-refcount-table", func(t *testing.T, d string) string {
			f := base(t, d)
			b, _ := os.ReadFile(f)
			binary.BigEndian.PutUint32(b[56:], 1<<30)
			os.WriteFile(f, b, 0o644)
			return f
		}, ErrCorrupt, []string{"refcount table too large"}},
		{"l2-past-eof", func(t *testing.T, d string) string {
			f := base(t, d)
			h, _ := header(t, f)
			put64(t, f, int64(h.L1TableOffset), oflagCopied|1<<40)
			return f
		}, ErrCorrupt, []string{"L2 table offset 0x10000000000 past the end", "index 0", "at offset 0x"}},
		{"l2-unaligned", func(t *testing.T, d string) string {
			f := base(t, d)
			h, b := header(t, f)
			put64(t, f, int64(h.L1TableOffset), get64(b, h.L1TableOffset)+512)
			return f
		}, ErrCorrupt, []string{"L2 table offset", "unaligned"}},
		{"data-cluster-unaligned", func(t *testing.T, d string) string {
			f := base(t, d)
			h, b := header(t, f)
			l2 := get64(b, h.L1TableOffset) & l1eOffsetMask
			put64(t, f, int64(l2), get64(b, l2)+512)
			return f
		}, ErrCorrupt, []string{"cluster offset", "unaligned", "index 0"}},
		{"data-cluster-past-eof", func(t *testing.T, d string) string {
			f := base(t, d)
			h, b := header(t, f)
			l2 := get64(b, h.L1TableOffset) & l1eOffsetMask
			put64(t, f, int64(l2+8), oflagCopied|1<<45)
			return f
		}, ErrCorrupt, []string{"data cluster offset 0x200000000000 past the end", "index 1"}},
		{"compressed-length-out-of-range", func(t *testing.T, d string) string {
			f, l2 := compressed(t, d)
			_, b := header(t, f)
			// Point the cluster at the last sector of the file with the
			// largest sector count the entry can hold.
			shift := 62 - (16 - 8)
			last := uint64(len(b)-512) &^ 511
			e := uint64(oflagCompressed) | ((1<<(16-8))-1)<<shift | last
			put64(t, f, int64(l2), e)
			return f
		}, ErrCorrupt, []string{"compressed cluster", "past the end of the file"}},
		{"compressed-garbage", func(t *testing.T, d string) string {
			f, l2 := compressed(t, d)
			_, b := header(t, f)
			coff := int64(get64(b, l2) & (1<<(62-8) - 1))
			fh, _ := os.OpenFile(f, os.O_RDWR, 0)
			fh.WriteAt([]byte("\xff\xff\xff\xff garbage that does not inflate \xff\xff"), coff)
			fh.Close()
			return f
		}, ErrCorrupt, []string{"compressed cluster", "zlib"}},
		{"extended-l2-invalid-bitmap", func(t *testing.T, d string) string {
			f := filepath.Join(d, "a.qcow2")
			mustRun(t, d, "qemu-img", "create", "-f", "qcow2", "-o", "extended_l2=on", f, "1M")
			mustRun(t, d, "qemu-io", "-f", "qcow2", "-c", "w -P 1 0 4k", f)
			h, b := header(t, f)
			l2 := get64(b, h.L1TableOffset) & l1eOffsetMask
			put64(t, f, int64(l2+8), 0x0000000100000001) // subcluster 0 both allocated and zero
			return f
		}, ErrCorrupt, []string{"invalid subcluster allocation bitmap"}},
		{"unknown-incompatible-feature", func(t *testing.T, d string) string {
			f := base(t, d)
			h, _ := header(t, f)
			put64(t, f, 72, h.IncompatibleFeatures|1<<40)
			return f
		}, ErrUnsupported, []string{"unknown feature bit 40"}},
		{"encrypted", func(t *testing.T, d string) string {
			f := filepath.Join(d, "a.qcow2")
			mustRun(t, d, "qemu-img", "create", "-f", "qcow2", "--object", "secret,id=s0,data=123456",
				"-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", f, "1M")
			return f
		}, ErrUnsupported, []string{"encrypt"}},
		{"backing-loop", func(t *testing.T, d string) string {
			a, b := filepath.Join(d, "a.qcow2"), filepath.Join(d, "b.qcow2")
			mustRun(t, d, "qemu-img", "create", "-f", "qcow2", b, "1M")
			mustRun(t, d, "qemu-img", "create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", a)
			mustRun(t, d, "qemu-img", "rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", b)
			return a
		}, ErrBackingChain, []string{"loops"}},
		{"backing-too-deep", func(t *testing.T, d string) string {
			mustRun(t, d, "qemu-img", "create", "-f", "qcow2", "l0.qcow2", "1M")
			for i := 1; i <= MaxChainDepth; i++ {
				mustRun(t, d, "qemu-img", "create", "-f", "qcow2", "-u", "-b", fmt.Sprintf("l%d.qcow2", i-1), "-F", "qcow2", fmt.Sprintf("l%d.qcow2", i), "1M")
			}
			return filepath.Join(d, fmt.Sprintf("l%d.qcow2", MaxChainDepth))
		}, ErrBackingChain, []string{"deeper than"}},
		{"backing-fifo", func(t *testing.T, d string) string {
			f := filepath.Join(d, "a.qcow2")
			mustRun(t, d, "mkfifo", filepath.Join(d, "fifo"))
			mustRun(t, d, "qemu-img", "create", "-f", "qcow2", "-u", "-b", "fifo", "-F", "raw", f, "1M")
			return f
		}, nil, []string{"fifo: not a regular file or block device"}},
		{"backing-directory", func(t *testing.T, d string) string {
			f := filepath.Join(d, "a.qcow2")
			os.Mkdir(filepath.Join(d, "dir"), 0o755)
			mustRun(t, d, "qemu-img", "create", "-f", "qcow2", "-u", "-b", "dir", "-F", "raw", f, "1M")
			return f
		}, nil, []string{"dir: not a regular file or block device"}},
		{"backing-missing", func(t *testing.T, d string) string {
			f := filepath.Join(d, "a.qcow2")
			mustRun(t, d, "qemu-img", "create", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", f, "1M")
			return f
		}, os.ErrNotExist, []string{"gone.qcow2"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			f := c.setup(t, t.TempDir())
			err := useImage(f, Options{Format: "qcow2"})
			if err == nil {
				t.Fatalf("no error")
			}
			if c.is != nil && !errors.Is(err, c.is) {
				t.Errorf("error %q does not wrap %v", err, c.is)
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

// TestDirtyImageOpensWithWarning: the dirty bit allows read-only use, with
// a warning.
func TestDirtyImageOpensWithWarning(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img not installed")
	}
	d := t.TempDir()
	f := filepath.Join(d, "a.qcow2")
	mustRun(t, d, "qemu-img", "create", "-f", "qcow2", f, "1M")
	h, _ := header(t, f)
	put64(t, f, 72, h.IncompatibleFeatures|IncompatDirty)
	var warnings []string
	im, err := Open(f, Options{Warn: func(s string) { warnings = append(warnings, s) }})
	if err != nil {
		t.Fatal(err)
	}
	im.Close()
	if len(warnings) != 1 || !strings.Contains(warnings[0], "dirty") {
		t.Errorf("warnings %q, want one about the dirty bit", warnings)
	}
}
