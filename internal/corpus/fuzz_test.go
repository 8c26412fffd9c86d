package corpus

import (
	"encoding/binary"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/nbdgw/nbdgw/qcow2"
)

// region is a metadata structure the structure-aware fuzzer aims at.
type region uint8

const (
	rHeader region = iota
	rExtensions
	rL1
	rL2
	rRefTable
	rRefBlock
	rBitmapDir
	rBitmapTable
	rCompressed
	nRegions
)

// FuzzMetadata patches one 8-byte word inside one metadata structure of
// a valid qemu-img image (header, header extensions, L1, L2, refcount
// table and block, bitmap directory and table, compressed data) and
// uses the result fully: open, block status over the whole image, read
// everything, every bitmap. Random bytes rarely reach past the header;
// aiming at the structures themselves does. Errors are expected; panics,
// hangs and errors that do not wrap one of the engine's sentinels (or an
// OS error) are not.
func FuzzMetadata(f *testing.F) {
	for _, tool := range []string{"qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(tool); err != nil {
			f.Skipf("%s not installed", tool)
		}
	}
	g := &gen{dir: f.TempDir()}
	if err := g.templates(); err != nil {
		f.Fatal(err)
	}
	var tmpls [][]byte
	for _, p := range []string{g.plain, g.compressed, g.extl2, g.bitmap, g.small} {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		tmpls = append(tmpls, b)
	}
	for r := region(0); r < nRegions; r++ {
		for t := range tmpls {
			f.Add(uint8(t), uint8(r), uint32(0), uint64(1<<63|0x10000))
			f.Add(uint8(t), uint8(r), uint32(1), ^uint64(0))
		}
	}
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, tmpl, reg uint8, index uint32, value uint64) {
		b := append([]byte(nil), tmpls[int(tmpl)%len(tmpls)]...)
		im := &image{path: filepath.Join(dir, "f.qcow2"), b: b}
		h, err := qcow2.ParseHeader("t", b[:min(len(b), 2<<20)], int64(len(b)))
		if err != nil {
			t.Fatal(err)
		}
		im.h = h
		off, ok := im.target(region(reg)%nRegions, uint64(index))
		if !ok || off+8 > uint64(len(b)) {
			return
		}
		binary.BigEndian.PutUint64(b[off:], value)
		if err := os.WriteFile(im.path, b, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := exercise(im.path, qcow2.Options{Format: "qcow2", NoBacking: true}); err != nil && !wrapsSentinel(err) {
			t.Errorf("error wraps none of the engine's sentinels (nor an OS error): %v", err)
		}
	})
}

// wrapsSentinel reports whether err can be classified as the engine
// promises: it wraps one of qcow2's sentinel errors, or an OS error.
func wrapsSentinel(err error) bool {
	for _, s := range []error{qcow2.ErrNotQcow2, qcow2.ErrUnsupported, qcow2.ErrCorrupt, qcow2.ErrBackingChain, qcow2.ErrNoBitmap, qcow2.ErrFailed} {
		if errors.Is(err, s) {
			return true
		}
	}
	var pe *os.PathError
	return errors.As(err, &pe)
}

// target is the file offset of word index of structure r, if the image
// has that structure.
func (im *image) target(r region, index uint64) (uint64, bool) {
	h := im.h
	cs := uint64(h.ClusterSize())
	word := func(base, size uint64) (uint64, bool) {
		if base == 0 || size < 8 {
			return 0, false
		}
		return base + (index%(size/8))*8, true
	}
	switch r {
	case rHeader:
		return word(8, uint64(h.HeaderLength)-8) // keep the magic
	case rExtensions:
		return word(uint64(h.HeaderLength)&^7, cs-uint64(h.HeaderLength)&^7)
	case rL1:
		return word(h.L1TableOffset, uint64(h.L1Size)*8)
	case rL2:
		return word(im.l2(), cs)
	case rRefTable:
		return word(h.RefcountTableOffset, uint64(h.RefcountTableClusters)*cs)
	case rRefBlock:
		return word(im.get64(h.RefcountTableOffset)&^511, cs)
	case rBitmapDir:
		if !h.HasBitmapExt {
			return 0, false
		}
		return word(h.BitmapDirOffset, h.BitmapDirSize)
	case rBitmapTable:
		if !h.HasBitmapExt {
			return 0, false
		}
		return word(im.get64(h.BitmapDirOffset)&0x00fffffffffffe00, 8)
	case rCompressed:
		e := im.get64(im.l2())
		if e&compressed == 0 {
			return 0, false
		}
		return word(e&(1<<(62-(h.ClusterBits-8))-1)&^7, 512)
	}
	return 0, false
}

// exercise opens name with opts and reads all of it.
func exercise(name string, opts qcow2.Options) error {
	opts.Warn = func(string) {}
	img, err := qcow2.Open(name, opts)
	if err != nil {
		return err
	}
	defer img.Close()
	var first error
	keep := func(err error) {
		if first == nil && err != nil {
			first = err
		}
	}
	keep(img.BlockStatus(0, img.Size(), func(qcow2.Extent) error { return nil }))
	p := make([]byte, 1<<20)
	for off := int64(0); off < img.Size(); off += int64(len(p)) {
		if _, err := img.ReadAt(p[:min(int64(len(p)), img.Size()-off)], off); err != nil && err != io.EOF {
			keep(err)
			break
		}
	}
	for _, b := range img.Bitmaps() {
		keep(img.BitmapStatus(b.Name, 0, img.Size(), func(int64, int64, bool) error { return nil }))
	}
	return first
}
