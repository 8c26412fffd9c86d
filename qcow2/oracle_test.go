package qcow2_test

// Oracle tests: every image here is built with QEMU's own tools, and every
// answer the engine gives is compared with what QEMU reports for the same
// image on this machine. Nothing expected is typed by hand.

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nbdgw/nbdgw/internal/metactx"
	"github.com/nbdgw/nbdgw/internal/qemumap"
	"github.com/nbdgw/nbdgw/qcow2"
)

func needTools(t testing.TB, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (scripts/install-deps.sh installs it)", tool)
		}
	}
}

// run runs a command in dir and returns its standard output.
func run(t testing.TB, dir, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\n%s%s", name, strings.Join(args, " "), err, out.String(), errb.String())
	}
	return out.String()
}

// scenario builds one image (chain) in dir with QEMU's tools and returns
// the name of the image to open, relative to dir.
type scenario struct {
	name      string
	build     func(t testing.TB, dir string) string
	noBacking bool
	bitmaps   []string // bitmaps to export with qemu-nbd -B
}

func img(t testing.TB, dir string, args ...string) { run(t, dir, "qemu-img", args...) }

func qio(t testing.TB, dir, file, format string, cmds ...string) {
	args := []string{"-f", format}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	run(t, dir, "qemu-io", append(args, file)...)
}

// writeRaw creates a raw file of size bytes with a few patterned and
// sparse regions.
func writeRaw(t testing.TB, dir, name string, size int64) {
	img(t, dir, "create", "-f", "raw", name, strconv.FormatInt(size, 10))
	qio(t, dir, name, "raw", "w -P 0x11 0 64k", "w -P 0x22 192k 100k", "w -P 0 400k 64k")
}

var scenarios = []scenario{
	{name: "empty-v3", build: func(t testing.TB, d string) string {
		img(t, d, "create", "-f", "qcow2", "a.qcow2", "10M")
		return "a.qcow2"
	}},
	{name: "data-and-zeroes", build: func(t testing.TB, d string) string {
		img(t, d, "create", "-f", "qcow2", "a.qcow2", "8M")
		qio(t, d, "a.qcow2", "qcow2", "w -P 1 0 64k", "w -P 2 128k 192k", "w -P 3 1M 4k",
			"w -z 2M 128k", "w -P 4 3M 128k", "w -z 3M 64k", "w -z -u 3136k 64k",
			"w -P 5 4M 256k", "discard 4160k 64k", "w -P 0 5M 64k")
		return "a.qcow2"
	}},
	{name: "v2-compat", build: func(t testing.TB, d string) string {
		img(t, d, "create", "-f", "qcow2", "-o", "compat=0.10", "a.qcow2", "4M")
		qio(t, d, "a.qcow2", "qcow2", "w -P 7 64k 64k", "w -z 1M 64k", "w -P 8 2M 1k")
		return "a.qcow2"
	}},
	{name: "cluster-512-unaligned", build: func(t testing.TB, d string) string {
		img(t, d, "create", "-f", "qcow2", "-o", "cluster_size=512", "a.qcow2", "1000000")
		qio(t, d, "a.qcow2", "qcow2", "w -P 1 0 1536", "w -P 2 70000 9000", "w -z 200000 4096", "w -P 3 999000 512")
		return "a.qcow2"
	}},
	{name: "cluster-4k", build: func(t testing.TB, d string) string {
		img(t, d, "create", "-f", "qcow2", "-o", "cluster_size=4096", "a.qcow2", "64M")
		qio(t, d, "a.qcow2", "qcow2", "w -P 1 0 8k", "w -P 2 2M 2M", "w -P 3 40M 4k", "w -z 41M 8k")
		return "a.qcow2"
	}},
	{name: "cluster-2m-unaligned", build: func(t testing.TB, d string) string {
		img(t, d, "create", "-f", "qcow2", "-o", "cluster_size=2M", "a.qcow2", "9437696")
		qio(t, d, "a.qcow2", "qcow2", "w -P 1 0 4k", "w -P 2 6M 100k", "w -P 3 9437184 512")
		return "a.qcow2"
	}},
	{name: "compressed-zlib", build: func(t testing.TB, d string) string {
		writeRaw(t, d, "src.raw", 1<<20)
		img(t, d, "convert", "-c", "-O", "qcow2", "src.raw", "a.qcow2")
		qio(t, d, "a.qcow2", "qcow2", "w -P 9 512k 64k")
		return "a.qcow2"
	}},
	{name: "compressed-zstd", build: func(t testing.TB, d string) string {
		writeRaw(t, d, "src.raw", 1<<20)
		img(t, d, "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", "src.raw", "a.qcow2")
		return "a.qcow2"
	}},
	{name: "compressed-4k-clusters", build: func(t testing.TB, d string) string {
		writeRaw(t, d, "src.raw", 1<<20)
		img(t, d, "convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", "src.raw", "a.qcow2")
		return "a.qcow2"
	}},
	{name: "extended-l2", build: func(t testing.TB, d string) string {
		img(t, d, "create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k", "a.qcow2", "4M")
		qio(t, d, "a.qcow2", "qcow2", "w -P 1 0 2k", "w -P 2 6k 4k", "w -z 16k 8k", "w -P 3 128k 64k",
			"w -z -u 130k 2k", "w -P 4 1M 2k", "discard 1M 2k")
		return "a.qcow2"
	}},
	{name: "extended-l2-backing", build: func(t testing.TB, d string) string {
		writeRaw(t, d, "base.raw", 1<<20)
		img(t, d, "create", "-f", "qcow2", "-o", "extended_l2=on", "-b", "base.raw", "-F", "raw", "a.qcow2")
		qio(t, d, "a.qcow2", "qcow2", "w -P 5 2k 2k", "w -z 200k 4k", "w -P 6 190k 1k")
		return "a.qcow2"
	}},
	{name: "external-data-file", build: func(t testing.TB, d string) string {
		img(t, d, "create", "-f", "qcow2", "-o", "data_file=a.data", "a.qcow2", "4M")
		qio(t, d, "a.qcow2", "qcow2", "w -P 1 64k 64k", "w -z 1M 64k", "w -P 2 2M 4k")
		return "a.qcow2"
	}},
	{name: "external-data-file-raw", build: func(t testing.TB, d string) string {
		img(t, d, "create", "-f", "qcow2", "-o", "data_file=a.data,data_file_raw=on", "a.qcow2", "4M")
		qio(t, d, "a.qcow2", "qcow2", "w -P 1 64k 64k", "w -P 2 2M 4k")
		return "a.qcow2"
	}},
	{name: "prealloc-metadata", build: func(t testing.TB, d string) string {
		img(t, d, "create", "-f", "qcow2", "-o", "preallocation=metadata", "a.qcow2", "8M")
		qio(t, d, "a.qcow2", "qcow2", "w -P 1 1M 64k", "w -P 2 5M 4k")
		return "a.qcow2"
	}},
	{name: "prealloc-falloc", build: func(t testing.TB, d string) string {
		img(t, d, "create", "-f", "qcow2", "-o", "preallocation=falloc", "a.qcow2", "4M")
		qio(t, d, "a.qcow2", "qcow2", "w -P 1 1M 64k")
		return "a.qcow2"
	}},
	{name: "prealloc-full", build: func(t testing.TB, d string) string {
		img(t, d, "create", "-f", "qcow2", "-o", "preallocation=full", "a.qcow2", "4M")
		return "a.qcow2"
	}},
	{name: "raw-image", build: func(t testing.TB, d string) string {
		writeRaw(t, d, "a.raw", 1<<20+1000)
		return "a.raw"
	}},
	{name: "seed-joint-allocation", build: seedChain},
	{name: "seed-joint-allocation-no-backing", build: seedChain, noBacking: true},
	{name: "three-layers-subdir", build: func(t testing.TB, d string) string {
		os.MkdirAll(filepath.Join(d, "base"), 0o755)
		img(t, d, "create", "-f", "qcow2", "base/b.qcow2", "4M")
		qio(t, d, "base/b.qcow2", "qcow2", "w -P 1 0 1M", "w -z 2M 64k")
		img(t, d, "create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "base/m.qcow2")
		qio(t, d, "base/m.qcow2", "qcow2", "w -P 2 512k 64k", "w -z 128k 64k", "w -P 3 3M 64k")
		img(t, d, "create", "-f", "qcow2", "-b", "base/m.qcow2", "-F", "qcow2", "top.qcow2")
		qio(t, d, "top.qcow2", "qcow2", "w -P 4 0 64k", "w -z 3M 64k")
		return "top.qcow2"
	}},
	{name: "short-backing", build: func(t testing.TB, d string) string {
		img(t, d, "create", "-f", "qcow2", "b.qcow2", "1M")
		qio(t, d, "b.qcow2", "qcow2", "w -P 1 0 1M")
		img(t, d, "create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2", "3M")
		qio(t, d, "a.qcow2", "qcow2", "w -P 2 2M 64k")
		return "a.qcow2"
	}},
	{name: "short-raw-backing-unaligned", build: func(t testing.TB, d string) string {
		img(t, d, "create", "-f", "raw", "b.raw", "300000")
		qio(t, d, "b.raw", "raw", "w -P 0x11 0 64k", "w -P 0x22 200000 99999")
		img(t, d, "create", "-f", "qcow2", "-b", "b.raw", "-F", "raw", "a.qcow2", "1M")
		return "a.qcow2"
	}},
	{name: "backing-without-format", build: func(t testing.TB, d string) string {
		img(t, d, "create", "-f", "qcow2", "b.qcow2", "1M")
		qio(t, d, "b.qcow2", "qcow2", "w -P 1 0 64k")
		img(t, d, "create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2", "1M")
		// qemu-img 7.2 no longer writes images without a backing format;
		// older ones exist. Rename the extension to an unknown type, which
		// QEMU ignores, so the backing format is probed.
		patchBytes(t, filepath.Join(d, "a.qcow2"), []byte{0xe2, 0x79, 0x2a, 0xca}, []byte{0x12, 0x34, 0x56, 0x78})
		return "a.qcow2"
	}},
	{name: "internal-snapshot", build: func(t testing.TB, d string) string {
		img(t, d, "create", "-f", "qcow2", "a.qcow2", "4M")
		qio(t, d, "a.qcow2", "qcow2", "w -P 1 0 128k")
		img(t, d, "snapshot", "-c", "snap1", "a.qcow2")
		qio(t, d, "a.qcow2", "qcow2", "w -P 2 64k 128k", "discard 0 64k")
		return "a.qcow2"
	}},
	{name: "refcount-bits-1", build: func(t testing.TB, d string) string {
		img(t, d, "create", "-f", "qcow2", "-o", "refcount_bits=1,preallocation=metadata", "a.qcow2", "2M")
		qio(t, d, "a.qcow2", "qcow2", "w -P 1 0 64k")
		return "a.qcow2"
	}},
	{name: "refcount-bits-64", build: func(t testing.TB, d string) string {
		img(t, d, "create", "-f", "qcow2", "-o", "refcount_bits=64,preallocation=metadata", "a.qcow2", "2M")
		qio(t, d, "a.qcow2", "qcow2", "w -P 1 0 64k")
		return "a.qcow2"
	}},
	{name: "lazy-refcounts-1m-clusters", build: func(t testing.TB, d string) string {
		img(t, d, "create", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=1M,refcount_bits=8", "a.qcow2", "20M")
		qio(t, d, "a.qcow2", "qcow2", "w -P 1 0 100k", "w -P 2 5M 3M", "w -z 10M 1M", "w -P 3 19M 1k")
		return "a.qcow2"
	}},
	{name: "amended-to-v2", build: func(t testing.TB, d string) string {
		img(t, d, "create", "-f", "qcow2", "a.qcow2", "4M")
		qio(t, d, "a.qcow2", "qcow2", "w -P 1 0 128k", "w -z 64k 64k", "w -z 1M 64k")
		img(t, d, "amend", "-o", "compat=0.10", "a.qcow2")
		return "a.qcow2"
	}},
	{name: "convert-prealloc-metadata", build: func(t testing.TB, d string) string {
		writeRaw(t, d, "src.raw", 2<<20)
		img(t, d, "convert", "-O", "qcow2", "-o", "preallocation=metadata", "src.raw", "a.qcow2")
		return "a.qcow2"
	}},
	{name: "compressed-extended-l2", build: func(t testing.TB, d string) string {
		writeRaw(t, d, "src.raw", 1<<20)
		img(t, d, "convert", "-c", "-O", "qcow2", "-o", "extended_l2=on", "src.raw", "a.qcow2")
		qio(t, d, "a.qcow2", "qcow2", "w -P 9 200k 4k", "w -z 640k 8k")
		return "a.qcow2"
	}},
	{name: "zstd-extended-l2-backing", build: func(t testing.TB, d string) string {
		writeRaw(t, d, "b.raw", 1<<20)
		img(t, d, "create", "-f", "qcow2", "-o", "extended_l2=on,compression_type=zstd", "-b", "b.raw", "-F", "raw", "a.qcow2")
		qio(t, d, "a.qcow2", "qcow2", "w -c -P 3 0 64k", "w -P 4 70k 2k", "w -z 300k 6k")
		return "a.qcow2"
	}},
	{name: "bitmap-in-backing-layer", bitmaps: []string{"base-bm"}, build: func(t testing.TB, d string) string {
		img(t, d, "create", "-f", "qcow2", "b.qcow2", "4M")
		img(t, d, "bitmap", "--add", "-g", "128k", "b.qcow2", "base-bm")
		qio(t, d, "b.qcow2", "qcow2", "w -P 1 1M 300k")
		img(t, d, "create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2")
		qio(t, d, "a.qcow2", "qcow2", "w -P 2 0 64k")
		return "a.qcow2"
	}},
	{name: "bitmap-fine-granularity", bitmaps: []string{"fine"}, build: func(t testing.TB, d string) string {
		img(t, d, "create", "-f", "qcow2", "-o", "cluster_size=4k", "a.qcow2", "3000000")
		img(t, d, "bitmap", "--add", "-g", "512", "a.qcow2", "fine")
		qio(t, d, "a.qcow2", "qcow2", "w -P 1 511 2", "w -P 2 100000 7000", "w -P 3 2999808 192")
		return "a.qcow2"
	}},
	{name: "bitmaps", bitmaps: []string{"b0", "b1"}, build: func(t testing.TB, d string) string {
		img(t, d, "create", "-f", "qcow2", "a.qcow2", "8M")
		img(t, d, "bitmap", "--add", "a.qcow2", "b0")
		img(t, d, "bitmap", "--add", "-g", "512k", "a.qcow2", "b1")
		qio(t, d, "a.qcow2", "qcow2", "w -P 1 0 64k", "w -P 2 3M 1k", "w -P 3 7M 1M")
		img(t, d, "bitmap", "--disable", "a.qcow2", "b1")
		qio(t, d, "a.qcow2", "qcow2", "w -P 4 5M 64k")
		return "a.qcow2"
	}},
}

// patchBytes replaces the first occurrence of old in the file's first
// cluster.
func patchBytes(t testing.TB, file string, old, new []byte) {
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	i := bytes.Index(b[:min(len(b), 65536)], old)
	if i < 0 {
		t.Fatalf("%x not found in %s", old, file)
	}
	copy(b[i:], new)
	if err := os.WriteFile(file, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// seedChain is the example of seed 000 (qemu:joint-allocation).
func seedChain(t testing.TB, d string) string {
	img(t, d, "create", "base.raw", strconv.Itoa(4*64*1024))
	img(t, d, "create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "top.qcow2")
	qio(t, d, "base.raw", "raw", "w -P 65 0 64k", "w -P 66 64k 64k", "w -P 67 128k 64k")
	qio(t, d, "top.qcow2", "qcow2", "w -P 69 64k 64k", "w -z 128k 64k")
	return "top.qcow2"
}

// qemuName is how QEMU's tools are told to open the image.
func (s scenario) qemuName(name string) string {
	if !s.noBacking {
		return name
	}
	return fmt.Sprintf(`json:{"driver":"qcow2","backing":null,"file":{"driver":"file","filename":%q}}`, name)
}

func TestAgainstQEMU(t *testing.T) {
	needTools(t, "qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")
	for _, s := range scenarios {
		t.Run(s.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			name := s.build(t, dir)
			checkScenario(t, dir, name, s)
		})
	}
}

func openIn(t testing.TB, dir, name string, noBacking bool) *qcow2.Image {
	t.Helper()
	wd, _ := os.Getwd()
	if err := os.Chdir(dir); err != nil {
		t.Fatal(err)
	}
	defer os.Chdir(wd)
	im, err := qcow2.Open(name, qcow2.Options{NoBacking: noBacking, Warn: func(string) {}})
	if err != nil {
		t.Fatalf("open %s: %v", name, err)
	}
	t.Cleanup(func() { im.Close() })
	return im
}

func checkScenario(t *testing.T, dir, name string, s scenario) {
	// QEMU runs in dir; open with the absolute path so names agree
	// (external data files are opened relative to the working directory
	// by QEMU, and relative to the image by our fallback).
	abs := filepath.Join(dir, name)
	im, err := qcow2.Open(abs, qcow2.Options{NoBacking: s.noBacking, Warn: func(string) {}})
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	defer im.Close()

	for _, asJSON := range []bool{true, false} {
		out := "human"
		if asJSON {
			out = "json"
		}
		want, werr := qemuImgMap(dir, s.qemuName(abs), out)
		var got bytes.Buffer
		gerr := qemumap.WriteImage(&got, im, asJSON)
		if (werr != nil) != (gerr != nil) {
			t.Errorf("map --output=%s: qemu-img error %v, ours %v", out, werr, gerr)
			continue
		}
		gs := got.String()
		if !asJSON {
			// QEMU names an external data file relative to its working
			// directory (dir); parallel tests cannot chdir, so we opened it
			// through the image's directory.
			gs = strings.ReplaceAll(gs, dir+"/a.data", "a.data")
		}
		if werr == nil && gs != want {
			t.Errorf("map --output=%s differs from qemu-img map\n--- qemu-img:\n%s--- nbdgw:\n%s", out, want, gs)
		}
	}

	// Content: byte for byte what qemu-img convert -O raw produces.
	raw := filepath.Join(dir, "converted.raw")
	run(t, dir, "qemu-img", "convert", "-O", "raw", s.qemuName(abs), raw)
	want, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, im.Size())
	if n, err := im.ReadAt(got, 0); err != nil && err != io.EOF || int64(n) != im.Size() {
		t.Fatalf("ReadAt: %d, %v", n, err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("content differs from qemu-img convert: sha256 %x, want %x (sizes %d, %d)", sha256.Sum256(got), sha256.Sum256(want), len(got), len(want))
	}
	// Unaligned reads of odd sizes agree with the whole.
	for _, r := range [][2]int64{{1, 511}, {65535, 3}, {im.Size() - 7, 7}, {im.Size() / 3, 100000}} {
		if r[0] < 0 || r[0]+r[1] > im.Size() {
			continue
		}
		p := make([]byte, r[1])
		if _, err := im.ReadAt(p, r[0]); err != nil {
			t.Fatalf("ReadAt(%d, %d): %v", r[0], r[1], err)
		}
		if !bytes.Equal(p, want[r[0]:r[0]+r[1]]) {
			t.Errorf("ReadAt(%d, %d) differs", r[0], r[1])
		}
	}

	checkContexts(t, dir, abs, s, im)
}

func qemuImgMap(dir, name, output string) (string, error) {
	cmd := exec.Command("qemu-img", "map", "--output="+output, name)
	cmd.Dir = dir
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("%v: %s", err, errb.String())
	}
	return out.String(), nil
}

// checkContexts compares every metadata context with what qemu-nbd serves
// for the same image, read through nbdinfo --map.
func checkContexts(t *testing.T, dir, abs string, s scenario, im *qcow2.Image) {
	sock := filepath.Join(dir, "qemu-nbd.sock")
	args := []string{"-r", "-t", "-A", "-k", sock}
	if strings.HasSuffix(abs, ".raw") {
		args = append(args, "-f", "raw")
	}
	for _, b := range s.bitmaps {
		args = append(args, "-B", b)
	}
	args = append(args, s.qemuName(abs))
	srv := exec.Command("qemu-nbd", args...)
	srv.Dir = dir
	var srvErr bytes.Buffer
	srv.Stderr = &srvErr
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { srv.Process.Kill(); srv.Wait() }()
	uri := "nbd+unix:///?socket=" + sock
	for i := 0; ; i++ {
		if c, err := net.Dial("unix", sock); err == nil { // listening, not merely bound
			c.Close()
			break
		}
		if i > 200 {
			t.Fatalf("qemu-nbd did not start: %s", srvErr.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	qemuMap := func(ctx string) string { return run(t, dir, "nbdinfo", "--map="+ctx, uri) }
	ours := func(ctx string) string {
		var b bytes.Buffer
		if err := metactx.WriteMap(&b, im, ctx, false); err != nil {
			t.Fatalf("WriteMap %s: %v", ctx, err)
		}
		return b.String()
	}
	ctxs := []string{metactx.BaseAllocation, metactx.AllocationDepth}
	for _, b := range s.bitmaps {
		ctxs = append(ctxs, metactx.DirtyBitmapPrefix+b)
	}
	maps := map[string]string{}
	for _, c := range ctxs {
		maps[c] = qemuMap(c)
		if got := ours(c); got != maps[c] {
			t.Errorf("context %s differs from qemu-nbd\n--- qemu-nbd:\n%s--- nbdgw:\n%s", c, maps[c], got)
		}
	}
	// qemu:joint-allocation as seed 000 defines it: base:allocation's two
	// bits, LOCAL for depth 1, BACKING for depth >= 2.
	want := jointFrom(t, maps[metactx.BaseAllocation], maps[metactx.AllocationDepth])
	if got := ours(metactx.JointAllocation); got != want {
		t.Errorf("joint-allocation differs from base:allocation + allocation-depth of qemu-nbd\n--- want:\n%s--- nbdgw:\n%s", want, got)
	}
}

type mapLine struct {
	off, n int64
	v      uint32
}

func parseMap(t testing.TB, s string) []mapLine {
	var out []mapLine
	for _, line := range strings.Split(strings.TrimSpace(s), "\n") {
		f := strings.Fields(line)
		if len(f) < 3 {
			t.Fatalf("bad nbdinfo line %q", line)
		}
		off, _ := strconv.ParseInt(f[0], 10, 64)
		n, _ := strconv.ParseInt(f[1], 10, 64)
		v, _ := strconv.ParseUint(f[2], 10, 32)
		out = append(out, mapLine{off, n, uint32(v)})
	}
	return out
}

func jointFrom(t testing.TB, base, depth string) string {
	b, d := parseMap(t, base), parseMap(t, depth)
	var out []byte
	var cur mapLine
	has := false
	for i, j, pos := 0, 0, int64(0); i < len(b) && j < len(d); {
		end := min(b[i].off+b[i].n, d[j].off+d[j].n)
		v := b[i].v
		if d[j].v == 1 {
			v |= metactx.StateLocal
		} else if d[j].v >= 2 {
			v |= metactx.StateBacking
		}
		if has && cur.v == v {
			cur.n += end - pos
		} else {
			if has {
				out = metactx.AppendText(out, metactx.JointAllocation, cur.off, cur.n, cur.v)
			}
			cur, has = mapLine{pos, end - pos, v}, true
		}
		pos = end
		if pos == b[i].off+b[i].n {
			i++
		}
		if pos == d[j].off+d[j].n {
			j++
		}
	}
	if has {
		out = metactx.AppendText(out, metactx.JointAllocation, cur.off, cur.n, cur.v)
	}
	return string(out)
}

// TestSeedJointAllocation checks the answer DESIGN.md gives for the seed
// example with the backing file cut off, which QEMU itself can no longer
// produce (the context was never merged).
func TestSeedJointAllocation(t *testing.T) {
	needTools(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	im := openIn(t, dir, seedChain(t, dir), true)
	var got []string
	err := metactx.Walk(im, metactx.JointAllocation, 0, im.Size(), func(off, n int64, f uint32) error {
		got = append(got, fmt.Sprintf("%d %d %d", off, n, f))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if want := "0 65536 3 / 65536 65536 4 / 131072 65536 7 / 196608 65536 3"; strings.Join(got, " / ") != want {
		t.Errorf("got %s, want %s", strings.Join(got, " / "), want)
	}
}
