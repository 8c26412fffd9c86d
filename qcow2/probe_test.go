package qcow2

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// qemuProbed is the format qemu-img info reports for path (probing).
func qemuProbed(t *testing.T, path string) string {
	t.Helper()
	out, err := exec.Command("qemu-img", "info", "--output=json", path).Output()
	if err != nil {
		t.Fatalf("qemu-img info %s: %v", path, err)
	}
	var m struct{ Format string }
	if err := json.Unmarshal(out, &m); err != nil {
		t.Fatal(err)
	}
	return m.Format
}

func qemuImg(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img %q: %v\n%s", args, err, out)
	}
}

// TestProbeFormatMatchesQemu: ProbeFormat on the first 512 bytes of
// images qemu-img made (and of descriptor variants that vmdk_probe's
// text rules accept) names what qemu-img info names.
func TestProbeFormatMatchesQemu(t *testing.T) {
	dir := t.TempDir()
	p := func(n string) string { return filepath.Join(dir, n) }
	var files []string
	for _, c := range []struct {
		name string
		args []string
	}{
		{"a.qcow2", []string{"-f", "qcow2"}},
		{"v2.qcow2", []string{"-f", "qcow2", "-o", "compat=0.10"}},
		{"a.raw", []string{"-f", "raw"}},
		{"a.vmdk", []string{"-f", "vmdk"}},
		{"d.vmdk", []string{"-f", "vmdk", "-o", "subformat=monolithicFlat"}},
		{"a.vpc", []string{"-f", "vpc"}},
		{"f.vpc", []string{"-f", "vpc", "-o", "subformat=fixed"}},
		{"a.vhdx", []string{"-f", "vhdx"}},
		{"a.vdi", []string{"-f", "vdi"}},
		{"a.qed", []string{"-f", "qed"}},
		{"a.parallels", []string{"-f", "parallels"}},
		{"a.qcow", []string{"-f", "qcow"}},
	} {
		qemuImg(t, append(append([]string{"create", "-q"}, c.args...), p(c.name), "1M")...)
		files = append(files, c.name)
	}
	// Descriptor variants: leading comments, blank lines of spaces, CRLF.
	desc, err := os.ReadFile(p("d.vmdk"))
	if err != nil {
		t.Fatal(err)
	}
	body := desc[bytes.Index(desc, []byte("version=")):]
	for name, b := range map[string][]byte{
		"spaces.vmdk": append([]byte("   \n# a comment\n  \r\n"), body...),
		"crlf.vmdk":   bytes.ReplaceAll(desc, []byte("\n"), []byte("\r\n")),
	} {
		if err := os.WriteFile(p(name), b, 0o644); err != nil {
			t.Fatal(err)
		}
		files = append(files, name)
	}
	// The qcow2 magic with version 0 is no format QEMU knows: raw.
	v0, _ := os.ReadFile(p("a.qcow2"))
	v0 = append([]byte(nil), v0...)
	copy(v0[4:8], []byte{0, 0, 0, 0})
	os.WriteFile(p("v0.img"), v0, 0o644)
	// Shorter than the magic: raw.
	os.WriteFile(p("short.img"), []byte("QFI"), 0o644)
	files = append(files, "v0.img", "short.img")
	for _, n := range files {
		b, err := os.ReadFile(p(n))
		if err != nil {
			t.Fatal(err)
		}
		got, want := ProbeFormat(b[:min(len(b), 512)], p(n)), qemuProbed(t, p(n))
		if got != want {
			t.Errorf("%s: ProbeFormat %s, qemu-img %s", n, got, want)
		}
	}
	// Only the first 512 bytes count, as QEMU's BLOCK_PROBE_BUF_SIZE.
	late := append(bytes.Repeat([]byte{'#'}, 600), []byte("\nversion=1\n")...)
	if f := ProbeFormat(late, "x"); f != FormatRaw {
		t.Errorf("a descriptor line past 512 bytes probes as %s", f)
	}
	if f := ProbeFormat(nil, "x.dmg"); f != "dmg" {
		t.Errorf("x.dmg probes as %s", f)
	}
	if f := ProbeFormat(nil, ".dmg"); f != FormatRaw {
		t.Errorf(".dmg (len 4) probes as %s", f)
	}
}

// TestOpenRefusesUnreadFormats: Open names the probed format and leaves
// the file as it was; a forced format it does not read is refused before
// anything is opened.
func TestOpenRefusesUnreadFormats(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "x.vhdx")
	qemuImg(t, "create", "-q", "-f", "vhdx", img, "1M")
	before, _ := os.ReadFile(img)
	_, err := Open(img, Options{Writable: true, Warn: func(string) {}})
	if err == nil || !errors.Is(err, ErrUnsupported) || err.Error() != img+": image format vhdx is not supported (nbdgw reads qcow2 and raw); use -f raw to read the file as raw" {
		t.Errorf("vhdx: %v", err)
	}
	if after, _ := os.ReadFile(img); !bytes.Equal(before, after) {
		t.Error("vhdx changed")
	}
	r, err := Open(img, Options{Format: "raw"})
	if err != nil {
		t.Fatal(err)
	}
	if f := r.Layers()[0].Format; f != "raw" {
		t.Errorf("-f raw: %s", f)
	}
	r.Close()
	for f, want := range map[string]string{"vpc": "image format vpc is not supported", "qcow3": `unknown image format "qcow3"`} {
		if _, err := Open(filepath.Join(dir, "missing"), Options{Format: f}); err == nil || !strings.Contains(err.Error(), want) || !errors.Is(err, ErrUnsupported) {
			t.Errorf("-f %s: %v", f, err)
		}
	}
	// An empty file is raw, as in QEMU's find_image_format().
	empty := filepath.Join(dir, "empty")
	os.WriteFile(empty, nil, 0o644)
	e, err := Open(empty, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if f := e.Layers()[0].Format; f != qemuProbed(t, empty) {
		t.Errorf("empty file: %s", f)
	}
	e.Close()
}

// TestProbedRawWriteGuard: a probed raw image refuses writes that would
// make sector 0 probe as another format (ErrReadOnly, QEMU's EPERM);
// other writes and -f raw images are not restricted.
func TestProbedRawWriteGuard(t *testing.T) {
	dir := t.TempDir()
	img, q := filepath.Join(dir, "r.img"), filepath.Join(dir, "q.qcow2")
	qemuImg(t, "create", "-q", "-f", "raw", img, "1M")
	qemuImg(t, "create", "-q", "-f", "qcow2", q, "1M")
	hdr, _ := os.ReadFile(q)
	var warned []string
	w, err := Open(img, Options{Writable: true, Warn: func(m string) { warned = append(warned, m) }})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if len(warned) != 1 || !strings.Contains(warned[0], "probing guessed raw") {
		t.Errorf("warnings %q", warned)
	}
	if _, err := w.WriteAt(hdr[:512], 0); !errors.Is(err, ErrReadOnly) {
		t.Errorf("qcow2 header at 0: %v", err)
	}
	// A partial write that completes a magic counts too: sector 0 is
	// judged as it would be after the write.
	if _, err := w.WriteAt([]byte("QFI"), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := w.WriteAt(hdr[3:8], 3); !errors.Is(err, ErrReadOnly) {
		t.Errorf("completing the magic: %v", err)
	}
	if err := w.WriteZeroes(0, 4096, 0); err != nil {
		t.Errorf("zeroes at 0: %v", err)
	}
	if _, err := w.WriteAt(hdr[:512], 512); err != nil {
		t.Errorf("qcow2 header at 512: %v", err)
	}
	if _, err := w.WriteAt([]byte("vhdxfile"), 0); !errors.Is(err, ErrReadOnly) {
		t.Errorf("vhdx signature at 0: %v", err)
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := qemuProbed(t, img); got != "raw" {
		t.Errorf("after the writes qemu-img probes %s", got)
	}
	f, err := Open(img, Options{Writable: true, Format: "raw"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(hdr[:512], 0); err != nil {
		t.Errorf("-f raw: %v", err)
	}
	f.Close()
}

// TestWritableNoBackingRefusedInOpen: the refusal is the engine's, and
// nothing is written.
func TestWritableNoBackingRefusedInOpen(t *testing.T) {
	dir := t.TempDir()
	base, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", base, "1M")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
	before, _ := os.ReadFile(top)
	_, err := Open(top, Options{Writable: true, NoBacking: true})
	if err == nil || err.Error() != "--writable --no-backing: "+top+` has a backing file ("base.qcow2"); partial-cluster writes would copy zeroes over its data: open it with its backing file, read-only, or with --snapshot` {
		t.Errorf("got %v", err)
	}
	if after, _ := os.ReadFile(top); !bytes.Equal(before, after) {
		t.Error("top changed")
	}
	for _, o := range []Options{{NoBacking: true}, {Writable: true}, {Snapshot: true, NoBacking: true}} {
		img, err := Open(top, o)
		if err != nil {
			t.Errorf("%+v: %v", o, err)
			continue
		}
		img.Close()
	}
	// Without a backing file, --writable --no-backing is fine.
	w, err := Open(base, Options{Writable: true, NoBacking: true})
	if err != nil {
		t.Fatal(err)
	}
	w.Close()
}

// TestReadHeaderCluster: the open reads the header cluster (its size
// from the header), not a fixed 2 MiB from the start of the file.
func TestReadHeaderCluster(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "c.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img, "1M")
	h, err := openHost(img, false)
	if err != nil {
		t.Fatal(err)
	}
	defer h.close()
	n, _ := h.length()
	b, err := readHeaderCluster(h, n)
	if err != nil || len(b) != 4096 {
		t.Errorf("read %d bytes, %v; want the 4096-byte cluster", len(b), err)
	}
	if _, err := ParseHeader(img, b, n); err != nil {
		t.Error(err)
	}
}

// TestSafeName: printable names print as they are, others quoted.
func TestSafeName(t *testing.T) {
	for in, want := range map[string]string{
		"/tmp/a b.qcow2":   "/tmp/a b.qcow2",
		"é.qcow2":          "é.qcow2",
		"\x1b[2J\r\nFAKE":  `"\x1b[2J\r\nFAKE"`,
		"bell\a":           `"bell\a"`,
		"bad\xffutf8":      `"bad\xffutf8"`,
		`quote"backslash\`: `"quote\"backslash\\"`,
	} {
		if got := SafeName(in); got != want {
			t.Errorf("SafeName(%q) = %s, want %s", in, got, want)
		}
	}
	e := &FormatError{File: "a\nb", Offset: -1, Index: -1, Msg: "m"}
	if e.Error() != `"a\nb": m` {
		t.Errorf("FormatError: %q", e.Error())
	}
}

// FuzzProbeFormat: any first bytes and name probe to raw, qcow2 or one of
// the formats refused by name, without panicking, and only the first 512
// bytes count.
func FuzzProbeFormat(f *testing.F) {
	f.Add([]byte("QFI\xfb\x00\x00\x00\x03"), "a.qcow2")
	f.Add([]byte("# Disk DescriptorFile\nversion=1\r\n"), "d.vmdk")
	f.Add([]byte("   \r\n#\nversion=3\n"), "x")
	f.Add([]byte("conectix"), "x.dmg")
	f.Add([]byte("LUKS\xba\xbe\x00\x01"), "")
	f.Fuzz(func(t *testing.T, b []byte, name string) {
		got := ProbeFormat(b, name)
		known := got == FormatRaw || got == FormatQcow2
		for _, u := range unreadFormats {
			known = known || got == u
		}
		if !known {
			t.Fatalf("ProbeFormat = %q", got)
		}
		if len(b) > probeBytes {
			if again := ProbeFormat(append(b[:probeBytes:probeBytes], 0xff), name); again != got {
				t.Fatalf("a byte past 512 changed the answer: %s, then %s", got, again)
			}
		}
	})
}

// TestReadAtDirect: O_DIRECT reads through the bounce buffer return what
// buffered reads return, at any offset and length, across the end of the
// file; and a qcow2 layer reads the same metadata with and without its
// O_DIRECT descriptor.
func TestReadAtDirect(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "f")
	data := make([]byte, 3*4096+100)
	for i := range data {
		data[i] = byte(i*7 + i/4096)
	}
	os.WriteFile(p, data, 0o644)
	h, err := openHost(p, false)
	if err != nil {
		t.Fatal(err)
	}
	defer h.close()
	fd := openDirect(h)
	if fd < 0 {
		t.Fatal("O_DIRECT unavailable on " + dir)
	}
	defer unix.Close(fd)
	for _, off := range []int64{0, 1, 511, 4095, 4096, 5000, 12288, 12387, 12388, 20000} {
		for _, n := range []int{1, 8, 100, 4096, 5000, 9000} {
			want, got := make([]byte, n), make([]byte, n)
			if err := h.readFull(want, off); err != nil {
				t.Fatal(err)
			}
			ok, err := readAtDirect(fd, got, off)
			if !ok || err != nil || !bytes.Equal(got, want) {
				t.Fatalf("off %d len %d: ok %v err %v, differs %v", off, n, ok, err, !bytes.Equal(got, want))
			}
		}
	}
	img := filepath.Join(dir, "a.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", img, "64M")
	if out, err := exec.Command("qemu-io", "-c", "write -P 1 0 1M", "-c", "write -P 2 40M 64k", img).CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	var maps [2][]Extent
	for i := range maps {
		im, err := Open(img, Options{})
		if err != nil {
			t.Fatal(err)
		}
		q := im.layers[0].(*qcow2Layer)
		if q.dfd < 0 {
			t.Fatal("no O_DIRECT descriptor")
		}
		if i == 1 { // the buffered fallback
			unix.Close(q.dfd)
			q.dfd = -1
			q.l2 = newLRU[int64](l2CacheBytes)
		}
		im.BlockStatus(0, im.Size(), func(e Extent) error { maps[i] = append(maps[i], e); return nil })
		im.Close()
	}
	if fmt.Sprint(maps[0]) != fmt.Sprint(maps[1]) || len(maps[0]) < 3 {
		t.Errorf("O_DIRECT %v\nbuffered %v", maps[0], maps[1])
	}
}
