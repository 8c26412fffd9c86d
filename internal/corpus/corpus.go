// Package corpus builds crafted corrupt qcow2 images for hardening tests,
// in the spirit of QEMU's iotests 060 and 080: valid images made by
// qemu-img and qemu-io, then one structure broken on purpose (bad magic,
// huge sizes, tables past the end of the file or unaligned, overlapping
// metadata, compressed lengths out of range, backing loops, chains deeper
// than the limit, bitmap directories and tables out of range, reserved
// bits, truncated files).
//
// Nothing is committed: Generate writes the corpus into a directory (a
// test's t.TempDir()) in a few seconds. Offsets are read back from the
// headers qemu-img wrote, never assumed.
package corpus

import (
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/nbdgw/nbdgw/qcow2"
)

// Stage says where a case is expected to fail.
type Stage int

const (
	// Open: opening the image fails, so every command fails at once
	// (map, info, serve, mount).
	Open Stage = iota
	// Read: the image opens (info works) but mapping or reading the
	// broken range fails.
	Read
	// Bitmap: only the dirty bitmap context (qemu:dirty-bitmap:b0)
	// fails; data and the other contexts are fine.
	Bitmap
	// Accept: QEMU reads the image without complaint (overlapping
	// metadata, ignored reserved bits, a dirty bit...): nbdgw must
	// agree with qemu-img convert byte for byte, or fail with a clear
	// error naming the problem.
	Accept
)

func (s Stage) String() string {
	return [...]string{"open", "read", "bitmap", "accept"}[s]
}

// Case is one crafted image.
type Case struct {
	Name  string
	Image string   // the file to open (top of its chain)
	Files []string // every file of the chain, Image first
	Stage Stage
	// Want lists substrings (case-insensitive) the error must contain:
	// the name of the broken structure.
	Want []string
	// Bitmap is the persistent bitmap the image carries ("" if none).
	Bitmap string
}

// Generate builds the corpus under dir, one subdirectory per case. It
// needs qemu-img and qemu-io.
func Generate(dir string) ([]Case, error) {
	g := &gen{dir: dir}
	if err := g.templates(); err != nil {
		return nil, err
	}
	var out []Case
	for _, c := range cases {
		cdir := filepath.Join(dir, c.name)
		if err := os.MkdirAll(cdir, 0o755); err != nil {
			return nil, err
		}
		files, err := c.build(g, cdir)
		if err != nil {
			return nil, fmt.Errorf("corpus case %s: %w", c.name, err)
		}
		out = append(out, Case{Name: c.name, Image: files[0], Files: files, Stage: c.stage, Want: c.want, Bitmap: c.bitmap})
	}
	return out, nil
}

// Names lists the cases Generate builds.
func Names() []string {
	var out []string
	for _, c := range cases {
		out = append(out, c.name)
	}
	return out
}

type gen struct {
	dir string
	// templates, each a valid image built once and copied per case
	plain, compressed, extl2, bitmap, small string
}

func run(dir, name string, args ...string) error {
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
	return nil
}

// templates builds the valid images every case starts from.
func (g *gen) templates() error {
	t := filepath.Join(g.dir, "_templates")
	if err := os.MkdirAll(t, 0o755); err != nil {
		return err
	}
	g.plain = filepath.Join(t, "plain.qcow2")
	g.compressed = filepath.Join(t, "compressed.qcow2")
	g.extl2 = filepath.Join(t, "extl2.qcow2")
	g.bitmap = filepath.Join(t, "bitmap.qcow2")
	g.small = filepath.Join(t, "small.qcow2")
	steps := [][]string{
		{"qemu-img", "create", "-q", "-f", "qcow2", g.plain, "4M"},
		{"qemu-io", "-f", "qcow2", "-c", "write -P 1 0 128k", "-c", "write -P 2 1M 64k", "-c", "write -z 2M 64k", g.plain},
		{"qemu-img", "create", "-q", "-f", "raw", filepath.Join(t, "src.raw"), "1M"},
		{"qemu-io", "-f", "raw", "-c", "write -P 3 0 1M", filepath.Join(t, "src.raw")},
		{"qemu-img", "convert", "-c", "-O", "qcow2", filepath.Join(t, "src.raw"), g.compressed},
		{"qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", g.extl2, "1M"},
		{"qemu-io", "-f", "qcow2", "-c", "write -P 4 0 4k", "-c", "write -P 5 64k 64k", g.extl2},
		{"qemu-img", "create", "-q", "-f", "qcow2", g.bitmap, "4M"},
		{"qemu-img", "bitmap", "--add", g.bitmap, "b0"},
		{"qemu-io", "-f", "qcow2", "-c", "write -P 6 0 64k", "-c", "write -P 7 3M 64k", g.bitmap},
		{"qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", g.small, "1M"},
		{"qemu-io", "-f", "qcow2", "-c", "write -P 8 0 8k", g.small},
	}
	for _, s := range steps {
		if err := run(t, s[0], s[1:]...); err != nil {
			return err
		}
	}
	return nil
}

// copyOf copies a template into dir as name.
func copyOf(tmpl, dir, name string) (string, error) {
	b, err := os.ReadFile(tmpl)
	if err != nil {
		return "", err
	}
	p := filepath.Join(dir, name)
	return p, os.WriteFile(p, b, 0o644)
}

// image is a file being patched, with its header as qemu-img wrote it.
type image struct {
	path string
	b    []byte
	h    *qcow2.Header
	err  error
}

func open(path string) *image {
	b, err := os.ReadFile(path)
	if err != nil {
		return &image{path: path, err: err}
	}
	h, err := qcow2.ParseHeader(path, b[:min(len(b), 2<<20)], int64(len(b)))
	return &image{path: path, b: b, h: h, err: err}
}

func (im *image) put64(off uint64, v uint64) *image {
	if im.err == nil && off+8 <= uint64(len(im.b)) {
		binary.BigEndian.PutUint64(im.b[off:], v)
	} else if im.err == nil {
		im.err = fmt.Errorf("put64 at %#x outside %d bytes", off, len(im.b))
	}
	return im
}

func (im *image) put32(off uint64, v uint32) *image {
	if im.err == nil && off+4 <= uint64(len(im.b)) {
		binary.BigEndian.PutUint32(im.b[off:], v)
	} else if im.err == nil {
		im.err = fmt.Errorf("put32 at %#x outside %d bytes", off, len(im.b))
	}
	return im
}

func (im *image) put16(off uint64, v uint16) *image {
	if im.err == nil && off+2 <= uint64(len(im.b)) {
		binary.BigEndian.PutUint16(im.b[off:], v)
	} else if im.err == nil {
		im.err = fmt.Errorf("put16 at %#x outside %d bytes", off, len(im.b))
	}
	return im
}

func (im *image) put8(off uint64, v byte) *image {
	if im.err == nil && off < uint64(len(im.b)) {
		im.b[off] = v
	} else if im.err == nil {
		im.err = fmt.Errorf("put8 at %#x outside %d bytes", off, len(im.b))
	}
	return im
}

func (im *image) get64(off uint64) uint64 {
	if im.err != nil || off+8 > uint64(len(im.b)) {
		if im.err == nil {
			im.err = fmt.Errorf("get64 at %#x outside %d bytes", off, len(im.b))
		}
		return 0
	}
	return binary.BigEndian.Uint64(im.b[off:])
}

// l2 is the host offset of the first L2 table.
func (im *image) l2() uint64 {
	if im.err != nil {
		return 0
	}
	return im.get64(im.h.L1TableOffset) & 0x00fffffffffffe00
}

// ext finds the header extension typ: the offset of its data.
func (im *image) ext(typ uint32) uint64 {
	if im.err != nil {
		return 0
	}
	off := uint64(im.h.HeaderLength)
	for off+8 <= uint64(len(im.b)) && off < uint64(im.h.ClusterSize()) {
		t := binary.BigEndian.Uint32(im.b[off:])
		n := uint64(binary.BigEndian.Uint32(im.b[off+4:]))
		if t == typ {
			return off + 8
		}
		if t == 0 {
			break
		}
		off += 8 + (n+7)&^7
	}
	im.err = fmt.Errorf("no header extension %#x", typ)
	return 0
}

func (im *image) truncate(n int) *image {
	if im.err == nil && n <= len(im.b) {
		im.b = im.b[:n]
	}
	return im
}

func (im *image) save() error {
	if im.err != nil {
		return im.err
	}
	return os.WriteFile(im.path, im.b, 0o644)
}

// Header field offsets (qcow2-spec.txt).
const (
	hVersion     = 4
	hBackingOff  = 8
	hBackingSize = 16
	hClusterBits = 20
	hSize        = 24
	hCrypt       = 32
	hL1Size      = 36
	hL1Off       = 40
	hRefOff      = 48
	hRefClusters = 56
	hNbSnap      = 60
	hSnapOff     = 64
	hIncompat    = 72
	hAutoclear   = 88
	hRefOrder    = 96
	hHeaderLen   = 100
	hCompression = 104
)

const (
	extBitmaps = 0x23852875
	extFeature = 0x6803f857
	copied     = 1 << 63
	compressed = 1 << 62
)

// spec is how one case is built.
type spec struct {
	name   string
	stage  Stage
	want   []string
	bitmap string
	build  func(g *gen, dir string) ([]string, error)
}

// patch builds a case from a template with one patch function.
func patch(tmpl func(*gen) string, f func(im *image)) func(*gen, string) ([]string, error) {
	return func(g *gen, dir string) ([]string, error) {
		p, err := copyOf(tmpl(g), dir, "image.qcow2")
		if err != nil {
			return nil, err
		}
		im := open(p)
		f(im)
		return []string{p}, im.save()
	}
}

func plain(g *gen) string      { return g.plain }
func zipped(g *gen) string     { return g.compressed }
func extl2(g *gen) string      { return g.extl2 }
func withBitmap(g *gen) string { return g.bitmap }
func small(g *gen) string      { return g.small }

// bitmapEntry is the offset of the first bitmap directory entry.
func (im *image) bitmapEntry() uint64 {
	e := im.ext(extBitmaps)
	if im.err != nil {
		return 0
	}
	return im.get64(e + 16)
}

// chain builds top.qcow2 -> ... with backing files created by qemu-img;
// layers[0] is the top. mk fills in each layer name's content.
func chain(dir string, names []string, fmts []string) error {
	for i := len(names) - 1; i >= 0; i-- {
		args := []string{"create", "-q", "-f", "qcow2"}
		if i+1 < len(names) {
			args = append(args, "-u", "-b", names[i+1], "-F", fmts[i+1])
		}
		args = append(args, names[i], "1M")
		if err := run(dir, "qemu-img", args...); err != nil {
			return err
		}
	}
	return nil
}

func join(dir string, names ...string) []string {
	out := make([]string, len(names))
	for i, n := range names {
		out[i] = filepath.Join(dir, n)
	}
	return out
}

var cases = []spec{
	// --- header ---
	{name: "bad-magic-backing", stage: Open, want: []string{"magic", "base.qcow2"},
		build: func(g *gen, dir string) ([]string, error) {
			if _, err := copyOf(g.plain, dir, "base.qcow2"); err != nil {
				return nil, err
			}
			if err := run(dir, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", "4M"); err != nil {
				return nil, err
			}
			im := open(filepath.Join(dir, "base.qcow2"))
			im.put32(0, 0x514649fc)
			return join(dir, "top.qcow2", "base.qcow2"), im.save()
		}},
	{name: "version-1", stage: Open, want: []string{"version 1"}, build: patch(plain, func(im *image) { im.put32(hVersion, 1) })},
	{name: "version-4", stage: Open, want: []string{"version 4"}, build: patch(plain, func(im *image) { im.put32(hVersion, 4) })},
	{name: "cluster-bits-8", stage: Open, want: []string{"cluster size"}, build: patch(plain, func(im *image) { im.put32(hClusterBits, 8) })},
	{name: "cluster-bits-63", stage: Open, want: []string{"cluster size"}, build: patch(plain, func(im *image) { im.put32(hClusterBits, 63) })},
	{name: "virtual-size-huge", stage: Open, want: []string{"virtual size"}, build: patch(plain, func(im *image) { im.put64(hSize, 1<<63) })},
	{name: "virtual-size-beyond-l1", stage: Open, want: []string{"L1 table too small"}, build: patch(plain, func(im *image) { im.put64(hSize, 1<<40) })},
	{name: "l1-size-huge", stage: Open, want: []string{"L1 table too large"}, build: patch(plain, func(im *image) { im.put32(hL1Size, 0xffffffff) })},
	{name: "l1-past-eof", stage: Open, want: []string{"L1 table", "past end of file"}, build: patch(plain, func(im *image) { im.put64(hL1Off, 1<<40) })},
	{name: "l1-unaligned", stage: Open, want: []string{"L1 table offset", "not aligned"}, build: patch(plain, func(im *image) { im.put64(hL1Off, im.h.L1TableOffset+8) })},
	{name: "refcount-table-past-eof", stage: Open, want: []string{"refcount table", "past end of file"}, build: patch(plain, func(im *image) { im.put64(hRefOff, 1<<50) })},
	{name: "refcount-table-unaligned", stage: Open, want: []string{"refcount table offset", "not aligned"}, build: patch(plain, func(im *image) { im.put64(hRefOff, im.h.RefcountTableOffset+512) })},
	{name: "refcount-table-huge", stage: Open, want: []string{"refcount table too large"}, build: patch(plain, func(im *image) { im.put32(hRefClusters, 1<<30) })},
	{name: "refcount-order-7", stage: Open, want: []string{"refcount order 7"}, build: patch(plain, func(im *image) { im.put32(hRefOrder, 7) })},
	{name: "header-length-small", stage: Open, want: []string{"header length 72"}, build: patch(plain, func(im *image) { im.put32(hHeaderLen, 72) })},
	{name: "header-length-huge", stage: Open, want: []string{"header length", "cluster size"}, build: patch(plain, func(im *image) { im.put32(hHeaderLen, 1<<20) })},
	{name: "extension-length-huge", stage: Open, want: []string{"header extension", "length"}, build: patch(plain, func(im *image) {
		e := im.ext(extFeature)
		im.put32(e-4, 0xfffffff0)
	})},
	{name: "snapshots-huge", stage: Open, want: []string{"snapshots"}, build: patch(plain, func(im *image) { im.put32(hNbSnap, 0x7fffffff) })},
	{name: "snapshot-table-past-eof", stage: Open, want: []string{"snapshot table", "past end of file"}, build: patch(plain, func(im *image) {
		im.put32(hNbSnap, 1)
		im.put64(hSnapOff, 1<<40)
	})},
	{name: "snapshot-table-unaligned", stage: Open, want: []string{"snapshot table offset", "not aligned"}, build: patch(plain, func(im *image) {
		im.put32(hNbSnap, 1)
		im.put64(hSnapOff, 0x200)
	})},
	// QEMU refuses a backing file name that does not lie inside the
	// first cluster ("Invalid backing file offset").
	{name: "backing-name-outside-cluster", stage: Open, want: []string{"backing file name", "outside"}, build: patch(plain, func(im *image) {
		im.put64(hBackingOff, 0x1fff0)
		im.put32(hBackingSize, 64)
	})},
	{name: "backing-name-too-long", stage: Open, want: []string{"backing file name too long"}, build: patch(plain, func(im *image) {
		im.put64(hBackingOff, 0x800)
		im.put32(hBackingSize, 60000)
	})},
	{name: "unknown-incompatible-bit", stage: Open, want: []string{"unsupported incompatible feature", "bit 40"}, build: patch(plain, func(im *image) { im.put64(hIncompat, 1<<40) })},
	{name: "encrypted-aes", stage: Open, want: []string{"encrypt"}, build: patch(plain, func(im *image) { im.put32(hCrypt, 1) })},
	{name: "compression-type-unknown", stage: Open, want: []string{"compression type 7"}, build: patch(plain, func(im *image) {
		im.put64(hIncompat, 1<<3)
		im.put8(hCompression, 7)
	})},
	{name: "compression-type-without-bit", stage: Open, want: []string{"compression type", "feature bit"}, build: patch(plain, func(im *image) { im.put8(hCompression, 1) })},
	{name: "extended-l2-small-cluster", stage: Open, want: []string{"extended L2", "16 KiB"}, build: patch(small, func(im *image) { im.put64(hIncompat, 1<<4) })},
	{name: "truncated-header", stage: Open, want: []string{"truncated header"}, build: patch(plain, func(im *image) { im.truncate(50) })},
	{name: "truncated-v3-header", stage: Open, want: []string{"truncated v3 header"}, build: patch(plain, func(im *image) { im.truncate(90) })},
	{name: "data-file-bit-without-name", stage: Open, want: []string{"data file"}, build: patch(plain, func(im *image) { im.put64(hIncompat, 1<<2) })},
	{name: "data-file-missing", stage: Open, want: []string{"data file", "missing.raw"},
		build: func(g *gen, dir string) ([]string, error) {
			p := filepath.Join(dir, "image.qcow2")
			if err := run(dir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=missing.raw", p, "1M"); err != nil {
				return nil, err
			}
			return []string{p}, os.Remove(filepath.Join(dir, "missing.raw"))
		}},
	// --- backing chains ---
	{name: "backing-loop-self", stage: Open, want: []string{"loops"},
		build: func(g *gen, dir string) ([]string, error) {
			if err := run(dir, "qemu-img", "create", "-q", "-f", "qcow2", "a.qcow2", "1M"); err != nil {
				return nil, err
			}
			return join(dir, "a.qcow2"), run(dir, "qemu-img", "rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", "a.qcow2")
		}},
	{name: "backing-loop-three", stage: Open, want: []string{"loops"},
		build: func(g *gen, dir string) ([]string, error) {
			if err := chain(dir, []string{"a.qcow2", "b.qcow2", "c.qcow2"}, []string{"qcow2", "qcow2", "qcow2"}); err != nil {
				return nil, err
			}
			return join(dir, "a.qcow2", "b.qcow2", "c.qcow2"), run(dir, "qemu-img", "rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", "c.qcow2")
		}},
	{name: "backing-too-deep", stage: Open, want: []string{"deeper than"},
		build: func(g *gen, dir string) ([]string, error) {
			var names, fmts []string
			for i := qcow2.MaxChainDepth + 1; i >= 1; i-- {
				names = append(names, fmt.Sprintf("l%02d.qcow2", i))
				fmts = append(fmts, "qcow2")
			}
			return join(dir, names...), chain(dir, names, fmts)
		}},
	{name: "backing-missing", stage: Open, want: []string{"gone.qcow2"},
		build: func(g *gen, dir string) ([]string, error) {
			return join(dir, "a.qcow2"), run(dir, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", "a.qcow2", "1M")
		}},
	{name: "backing-json", stage: Open, want: []string{"not a local file"},
		build: func(g *gen, dir string) ([]string, error) {
			return join(dir, "a.qcow2"), run(dir, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", `json:{"driver":"null-co"}`, "-F", "raw", "a.qcow2", "1M")
		}},
	// A backing file that is a FIFO: opening it for reading blocks until
	// a writer comes (qemu-img hangs too). A crafted image must not hang
	// the gateway: only regular files (and block devices) are layers.
	{name: "backing-fifo", stage: Open, want: []string{"fifo"},
		build: func(g *gen, dir string) ([]string, error) {
			if err := syscall.Mkfifo(filepath.Join(dir, "fifo"), 0o644); err != nil {
				return nil, err
			}
			return join(dir, "a.qcow2"), run(dir, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "fifo", "-F", "raw", "a.qcow2", "1M")
		}},
	{name: "backing-directory", stage: Open, want: []string{"adir", "directory"},
		build: func(g *gen, dir string) ([]string, error) {
			if err := os.Mkdir(filepath.Join(dir, "adir"), 0o755); err != nil {
				return nil, err
			}
			return join(dir, "a.qcow2"), run(dir, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "adir", "-F", "raw", "a.qcow2", "1M")
		}},
	{name: "backing-format-unknown", stage: Open, want: []string{"vmdk"},
		build: func(g *gen, dir string) ([]string, error) {
			if _, err := copyOf(g.plain, dir, "base.img"); err != nil {
				return nil, err
			}
			return join(dir, "a.qcow2", "base.img"), run(dir, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "base.img", "-F", "vmdk", "a.qcow2", "4M")
		}},
	// --- bitmaps extension and directory ---
	{name: "bitmap-directory-past-eof", stage: Open, want: []string{"bitmap directory", "past end of file"}, bitmap: "b0", build: patch(withBitmap, func(im *image) {
		im.put64(im.ext(extBitmaps)+16, 1<<40)
	})},
	{name: "bitmap-directory-unaligned", stage: Open, want: []string{"bitmap directory offset", "not cluster aligned"}, bitmap: "b0", build: patch(withBitmap, func(im *image) {
		e := im.ext(extBitmaps)
		im.put64(e+16, im.get64(e+16)+8)
	})},
	{name: "bitmap-directory-huge", stage: Open, want: []string{"bitmap directory too large"}, bitmap: "b0", build: patch(withBitmap, func(im *image) {
		im.put64(im.ext(extBitmaps)+8, 1<<40)
	})},
	{name: "bitmap-count-zero", stage: Open, want: []string{"number of bitmaps: 0"}, bitmap: "b0", build: patch(withBitmap, func(im *image) {
		im.put32(im.ext(extBitmaps), 0)
	})},
	{name: "bitmap-count-huge", stage: Open, want: []string{"number of bitmaps"}, bitmap: "b0", build: patch(withBitmap, func(im *image) {
		im.put32(im.ext(extBitmaps), 0xffffffff)
	})},
	{name: "bitmap-count-beyond-directory", stage: Open, want: []string{"bitmap directory entry"}, bitmap: "b0", build: patch(withBitmap, func(im *image) {
		im.put32(im.ext(extBitmaps), 1000)
	})},
	{name: "bitmap-extension-reserved", stage: Open, want: []string{"reserved"}, bitmap: "b0", build: patch(withBitmap, func(im *image) {
		im.put32(im.ext(extBitmaps)+4, 1)
	})},
	{name: "bitmap-granularity-bad", stage: Open, want: []string{"granularity"}, bitmap: "b0", build: patch(withBitmap, func(im *image) {
		im.put8(im.bitmapEntry()+17, 63)
	})},
	{name: "bitmap-name-size-zero", stage: Open, want: []string{"bitmap name size 0"}, bitmap: "b0", build: patch(withBitmap, func(im *image) {
		im.put16(im.bitmapEntry()+18, 0)
	})},
	{name: "bitmap-extra-data-huge", stage: Open, want: []string{"extra data too large"}, bitmap: "b0", build: patch(withBitmap, func(im *image) {
		im.put32(im.bitmapEntry()+20, 0x7fffffff)
	})},
	{name: "bitmap-reserved-flags", stage: Open, want: []string{"reserved flags"}, bitmap: "b0", build: patch(withBitmap, func(im *image) {
		im.put32(im.bitmapEntry()+12, 1<<20|2)
	})},
	{name: "bitmap-table-size-wrong", stage: Open, want: []string{"b0", "268435455"}, bitmap: "b0", build: patch(withBitmap, func(im *image) {
		im.put32(im.bitmapEntry()+8, 0xfffffff)
	})},
	{name: "bitmap-table-unaligned", stage: Open, want: []string{"table offset", "unaligned"}, bitmap: "b0", build: patch(withBitmap, func(im *image) {
		e := im.bitmapEntry()
		im.put64(e, im.get64(e)+8)
	})},
	// --- bitmap tables (only the bitmap context reads them) ---
	{name: "bitmap-table-past-eof", stage: Bitmap, want: []string{"bitmap", "past the end"}, bitmap: "b0", build: patch(withBitmap, func(im *image) {
		im.put64(im.bitmapEntry(), 1<<40)
	})},
	{name: "bitmap-table-entry-reserved", stage: Bitmap, want: []string{"reserved bits"}, bitmap: "b0", build: patch(withBitmap, func(im *image) {
		im.put64(im.get64(im.bitmapEntry()), 0xff00000000000002)
	})},
	{name: "bitmap-data-past-eof", stage: Bitmap, want: []string{"data cluster", "past the end"}, bitmap: "b0", build: patch(withBitmap, func(im *image) {
		im.put64(im.get64(im.bitmapEntry()), 1<<40)
	})},
	{name: "bitmap-data-unaligned", stage: Bitmap, want: []string{"data cluster", "unaligned"}, bitmap: "b0", build: patch(withBitmap, func(im *image) {
		im.put64(im.get64(im.bitmapEntry()), 0x10200)
	})},
	// --- L1/L2 entries, found on read ---
	{name: "l2-past-eof", stage: Read, want: []string{"L2 table offset", "past the end"}, build: patch(plain, func(im *image) {
		im.put64(im.h.L1TableOffset, copied|1<<40)
	})},
	{name: "l2-unaligned", stage: Read, want: []string{"L2 table offset", "unaligned"}, build: patch(plain, func(im *image) {
		im.put64(im.h.L1TableOffset, im.get64(im.h.L1TableOffset)+512)
	})},
	{name: "data-cluster-unaligned", stage: Read, want: []string{"cluster offset", "unaligned"}, build: patch(plain, func(im *image) {
		l2 := im.l2()
		im.put64(l2, im.get64(l2)+512)
	})},
	{name: "data-cluster-past-eof", stage: Read, want: []string{"data cluster offset", "past the end"}, build: patch(plain, func(im *image) {
		im.put64(im.l2()+8, copied|1<<45)
	})},
	{name: "truncated-data", stage: Read, want: []string{"past the end"}, build: patch(plain, func(im *image) {
		// Drop the last data cluster (qemu-io wrote 1M's cluster last).
		last := im.get64(im.l2()+16*8) & 0x00fffffffffffe00
		im.truncate(int(last))
	})},
	{name: "compressed-past-eof", stage: Read, want: []string{"compressed cluster", "past the end"}, build: patch(zipped, func(im *image) {
		shift := 62 - (16 - 8)
		last := uint64(len(im.b)-512) &^ 511
		im.put64(im.l2(), compressed|((1<<(16-8))-1)<<shift|last)
	})},
	{name: "compressed-offset-huge", stage: Read, want: []string{"compressed cluster", "past the end"}, build: patch(zipped, func(im *image) {
		im.put64(im.l2(), compressed|(1<<54-512))
	})},
	{name: "compressed-garbage", stage: Read, want: []string{"compressed cluster", "zlib"}, build: patch(zipped, func(im *image) {
		coff := im.get64(im.l2()) & (1<<54 - 1)
		for i := uint64(0); i < 64; i++ {
			im.put8(coff+i, 0xff)
		}
	})},
	{name: "compressed-short", stage: Accept, build: patch(zipped, func(im *image) {
		// One sector of compressed data: enough for a cluster of one
		// repeated byte, and QEMU reads it.
		e := im.get64(im.l2())
		im.put64(im.l2(), e&^(0xff<<54))
	})},
	{name: "extended-l2-invalid-bitmap", stage: Read, want: []string{"invalid subcluster allocation bitmap"}, build: patch(extl2, func(im *image) {
		im.put64(im.l2()+8, 0x0000000100000001)
	})},
	{name: "extended-l2-unallocated-with-bits", stage: Read, want: []string{"invalid subcluster allocation bitmap"}, build: patch(extl2, func(im *image) {
		im.put64(im.l2()+16+8, 0x00000000ffffffff) // entry 1: no host cluster, bits say allocated
		im.put64(im.l2()+16, 0)
	})},
	// --- accepted by QEMU: must agree with it (or fail clearly) ---
	{name: "l2-is-l1-table", stage: Accept, want: []string{"L1", "L2", "cluster"}, build: patch(plain, func(im *image) {
		im.put64(im.h.L1TableOffset, copied|im.h.L1TableOffset)
	})},
	{name: "l2-is-refcount-table", stage: Accept, build: patch(plain, func(im *image) {
		im.put64(im.h.L1TableOffset, copied|im.h.RefcountTableOffset)
	})},
	{name: "data-is-l1-table", stage: Accept, build: patch(plain, func(im *image) {
		im.put64(im.l2(), copied|im.h.L1TableOffset)
	})},
	{name: "data-is-l2-table", stage: Accept, build: patch(plain, func(im *image) {
		im.put64(im.l2()+8, copied|im.l2())
	})},
	{name: "l1-reserved-bits", stage: Accept, build: patch(plain, func(im *image) {
		im.put64(im.h.L1TableOffset, im.get64(im.h.L1TableOffset)|0x7f00000000000100)
	})},
	{name: "l2-reserved-bits", stage: Accept, build: patch(plain, func(im *image) {
		im.put64(im.l2(), im.get64(im.l2())|0x3f000000000001fe)
	})},
	{name: "refcount-block-past-eof", stage: Accept, build: patch(plain, func(im *image) {
		im.put64(im.h.RefcountTableOffset, 1<<40)
	})},
	{name: "dirty-bit", stage: Accept, build: patch(plain, func(im *image) { im.put64(hIncompat, 1) })},
	{name: "corrupt-bit", stage: Accept, build: patch(plain, func(im *image) { im.put64(hIncompat, 2) })},
	{name: "bitmaps-autoclear-cleared", stage: Accept, build: patch(withBitmap, func(im *image) { im.put64(hAutoclear, 0) })},
	{name: "empty-file", stage: Accept, build: patch(plain, func(im *image) { im.truncate(0) })},
}
