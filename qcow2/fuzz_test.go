package qcow2

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// seedImages builds small valid images with qemu-img/qemu-io (512-byte
// clusters keep them a few KiB) for the fuzzers' seed corpus.
func seedImages(f *testing.F) [][]byte {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		return nil
	}
	dir := f.TempDir()
	builds := []struct {
		opts, size string
		cmds       []string
	}{
		{"cluster_size=512", "64k", []string{"w -P 1 0 1k", "w -z 4k 1k"}},
		{"cluster_size=512,compat=0.10", "64k", []string{"w -P 2 512 512"}},
		{"cluster_size=16k,extended_l2=on", "256k", []string{"w -P 3 0 1k", "w -z 8k 512"}},
		{"cluster_size=512,refcount_bits=1", "64k", []string{"w -P 4 0 2k"}},
	}
	var out [][]byte
	for i, b := range builds {
		name := filepath.Join(dir, fmt.Sprintf("seed%d.qcow2", i))
		if err := exec.Command("qemu-img", "create", "-f", "qcow2", "-o", b.opts, name, b.size).Run(); err != nil {
			f.Fatalf("qemu-img create %s: %v", b.opts, err)
		}
		for _, c := range b.cmds {
			if err := exec.Command("qemu-io", "-f", "qcow2", "-c", c, name).Run(); err != nil {
				f.Fatalf("qemu-io %s: %v", c, err)
			}
		}
		data, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		out = append(out, data)
	}
	// A compressed image.
	raw, cz := filepath.Join(dir, "src.raw"), filepath.Join(dir, "c.qcow2")
	if err := os.WriteFile(raw, bytes.Repeat([]byte("nbdgw"), 1000), 0o644); err != nil {
		f.Fatal(err)
	}
	if err := exec.Command("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=512", raw, cz).Run(); err != nil {
		f.Fatal(err)
	}
	data, err := os.ReadFile(cz)
	if err != nil {
		f.Fatal(err)
	}
	return append(out, data)
}

// FuzzParseHeader: any byte string decodes to a header or an error, never
// a panic, and an accepted header's tables lie inside the file.
func FuzzParseHeader(f *testing.F) {
	for _, s := range seedImages(f) {
		f.Add(s[:min(len(s), 4096)], int64(len(s)))
	}
	f.Add([]byte("QFI\xfb"), int64(4))
	f.Add(wrappedBackingName(), int64(4096))
	f.Fuzz(func(t *testing.T, b []byte, fileSize int64) {
		if fileSize < int64(len(b)) {
			fileSize = int64(len(b))
		}
		h, err := ParseHeader("fuzz", b, fileSize)
		if err != nil {
			var fe *FormatError
			if !errors.As(err, &fe) {
				t.Fatalf("error %v is not a *FormatError", err)
			}
			return
		}
		if h.L1TableOffset+uint64(h.L1Size)*8 > uint64(fileSize) {
			t.Fatalf("accepted L1 table outside the file")
		}
		if h.ClusterBits < minClusterBits || h.ClusterBits > maxClusterBits {
			t.Fatalf("accepted cluster bits %d", h.ClusterBits)
		}
	})
}

// wrappedBackingName is a v2 header whose backing name offset plus size
// wraps around 2^64 to a small number (found by the fuzzer: it panicked).
func wrappedBackingName() []byte {
	b := make([]byte, 4096)
	binary.BigEndian.PutUint32(b[0:], Magic)
	binary.BigEndian.PutUint32(b[4:], 2)
	binary.BigEndian.PutUint64(b[8:], 0xffffffffffffff00)
	binary.BigEndian.PutUint32(b[16:], 0x200)
	binary.BigEndian.PutUint32(b[20:], 9)
	binary.BigEndian.PutUint64(b[40:], 512)  // L1 table
	binary.BigEndian.PutUint64(b[48:], 1024) // refcount table
	binary.BigEndian.PutUint32(b[56:], 1)
	return b
}

// FuzzBitmapDirectory: directory decoding bounds every length.
func FuzzBitmapDirectory(f *testing.F) {
	e := make([]byte, 32)
	binary.BigEndian.PutUint64(e[0:], 0x10000)
	binary.BigEndian.PutUint32(e[8:], 1)
	binary.BigEndian.PutUint32(e[12:], bmeFlagAuto)
	e[16], e[17] = 1, 16
	binary.BigEndian.PutUint16(e[18:], 2)
	copy(e[24:], "b0")
	f.Add(e, uint32(1))
	f.Add(e[:20], uint32(1))
	f.Fuzz(func(t *testing.T, dir []byte, n uint32) {
		bms, err := DecodeBitmapDirectory("fuzz", dir, 0x20000, n%70000, 65536, 1<<30)
		if err == nil && len(bms) != int(n%70000) {
			t.Fatalf("decoded %d bitmaps, want %d", len(bms), n%70000)
		}
	})
}

// FuzzImage opens arbitrary bytes as a qcow2 image and, if that succeeds,
// maps and reads it: errors are fine, panics and unbounded work are not.
// This covers L1/L2 entries, refcount blocks, compressed descriptors and
// bitmap tables together.
func FuzzImage(f *testing.F) {
	for _, s := range seedImages(f) {
		f.Add(s)
	}
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte) {
		name := filepath.Join(dir, "fuzz.qcow2")
		if err := os.WriteFile(name, data, 0o644); err != nil {
			t.Fatal(err)
		}
		im, err := Open(name, Options{Format: "qcow2", NoBacking: true, Warn: func(string) {}})
		if err != nil {
			return
		}
		defer im.Close()
		n := 0
		errStop := errors.New("stop")
		im.BlockStatus(0, im.Size(), func(e Extent) error {
			if e.Length <= 0 {
				t.Fatalf("extent with length %d", e.Length)
			}
			if n++; n > 10000 {
				return errStop
			}
			return nil
		})
		for _, off := range []int64{0, im.Size() / 2, im.Size() - 4096} {
			if off < 0 {
				continue
			}
			p := make([]byte, 4096)
			if _, err := im.ReadAt(p, off); err != nil && err != io.EOF {
				continue
			}
		}
		for _, b := range im.Bitmaps() {
			im.BitmapStatus(b.Name, 0, min(im.Size(), 1<<30), func(int64, int64, bool) error { return nil })
		}
	})
}
