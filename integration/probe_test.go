package integration

import (
	"bytes"
	"compress/zlib"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/nbdgw/nbdgw/qcow2"
	"golang.org/x/sys/unix"
)

// probeRun runs nbdgw with a deadline.
func probeRun(t *testing.T, bin string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	code = cmd.ProcessState.ExitCode()
	if err != nil && code == 0 {
		t.Fatalf("nbdgw %q: %v", args, err)
	}
	return o.String(), e.String(), code
}

// probeRefused checks a refusal: exit 1, one line on stderr mentioning
// every string of want.
func probeRefused(t *testing.T, bin string, want []string, args ...string) string {
	t.Helper()
	out, errOut, code := probeRun(t, bin, args...)
	if code != 1 || out != "" {
		t.Errorf("nbdgw %q: exit %d, stdout %q, stderr %q; want exit 1 and nothing on stdout", args, code, out, errOut)
	}
	if strings.Count(errOut, "\n") != 1 || !strings.HasSuffix(errOut, "\n") {
		t.Errorf("nbdgw %q: stderr is not one line: %q", args, errOut)
	}
	for _, w := range want {
		if !strings.Contains(errOut, w) {
			t.Errorf("nbdgw %q: stderr %q does not mention %q", args, errOut, w)
		}
	}
	return errOut
}

// probeQemuInfo is qemu-img info --output=json of path, decoded.
func probeQemuInfo(t *testing.T, args ...string) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(runOutput(t, "qemu-img", append([]string{"info", "--output=json"}, args...)...), &m); err != nil {
		t.Fatal(err)
	}
	return m
}

// probeNbdgwInfo is nbdgw info --output=json, decoded.
func probeNbdgwInfo(t *testing.T, bin string, args ...string) probeInfo {
	t.Helper()
	var ci probeInfo
	out := runOutput(t, bin, append([]string{"info", "--output=json"}, args...)...)
	if err := json.Unmarshal(out, &ci); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	return ci
}

// probeInfo is what the probe tests read of nbdgw info --output=json
// (qemu-img info's keys).
type probeInfo struct {
	Format      string `json:"format"`
	VirtualSize int64  `json:"virtual-size"`
	Nbdgw       struct {
		DataFileOpened string `json:"data-file-opened"`
		Layers         []struct {
			Filename string `json:"filename"`
		} `json:"layers"`
	} `json:"nbdgw"`
}

// probeSums hashes every regular file under dir.
func probeSums(t *testing.T, dir string) map[string]string {
	t.Helper()
	sums := map[string]string{}
	err := filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil || !fi.Mode().IsRegular() {
			return err
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		h := sha256.New()
		if _, err := io.Copy(h, f); err != nil {
			return err
		}
		sums[p] = hex.EncodeToString(h.Sum(nil)) + " " + fi.ModTime().String()
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return sums
}

func probeSame(t *testing.T, before, after map[string]string) {
	t.Helper()
	for p, s := range before {
		if after[p] != s {
			t.Errorf("%s changed", p)
		}
	}
}

func probeQemuImg(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img %q: %v\n%s", args, err, out)
	}
}

// probeBochs writes a minimal growing Bochs image (block/bochs.c's
// header: 64 KiB disk, one catalog entry, unallocated).
func probeBochs(t *testing.T, path string) {
	b := make([]byte, 516)
	copy(b, "Bochs Virtual HD Image")
	copy(b[32:], "Redolog")
	copy(b[48:], "Growing")
	le := binary.LittleEndian
	le.PutUint32(b[64:], 0x00020000) // version
	le.PutUint32(b[68:], 512)        // header size
	le.PutUint32(b[72:], 1)          // catalog entries
	le.PutUint32(b[76:], 512)        // bitmap size
	le.PutUint32(b[80:], 65536)      // extent size
	le.PutUint64(b[88:], 65536)      // disk size
	le.PutUint32(b[512:], 0xffffffff)
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// probeCloop writes a one-block cloop V2.0 image (block/cloop.c).
func probeCloop(t *testing.T, path string) {
	var z bytes.Buffer
	w := zlib.NewWriter(&z)
	w.Write(make([]byte, 512))
	w.Close()
	b := make([]byte, 152)
	copy(b, "#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")
	be := binary.BigEndian
	be.PutUint32(b[128:], 512) // block size
	be.PutUint32(b[132:], 1)   // blocks
	b = be.AppendUint64(b[:136], 152)
	b = be.AppendUint64(b, uint64(152+z.Len()))
	b = append(b, z.Bytes()...)
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestProbeFormats probes images of every format QEMU 10.0 probes and
// compares the name with qemu-img info's "format": qcow2 and raw open,
// the others are refused naming the format, and -f raw reads them as raw.
func TestProbeFormats(t *testing.T) {
	bin := nbdgwBinary(t)
	dir := t.TempDir()
	create := func(format string, opts ...string) func(string) {
		return func(p string) {
			probeQemuImg(t, append(append([]string{"create", "-q", "-f", format}, opts...), p, "1M")...)
		}
	}
	convert := func(format string) func(string) {
		return func(p string) {
			src := filepath.Join(dir, "src.raw")
			if _, err := os.Stat(src); err != nil {
				probeQemuImg(t, "create", "-q", "-f", "raw", src, "1M")
				if out, err := exec.Command("qemu-io", "-f", "raw", "-c", "write -P 0x5a 64k 128k", src).CombinedOutput(); err != nil {
					t.Fatalf("qemu-io: %v %s", err, out)
				}
			}
			probeQemuImg(t, "convert", "-f", "raw", "-O", format, src, p)
		}
	}
	cases := []struct {
		file  string
		build func(string)
		qemu  string // "": ask qemu-img info
	}{
		{"a.qcow2", create("qcow2"), ""},
		{"a.img", create("raw"), ""},
		{"sparse.vmdk", create("vmdk"), ""},
		{"flat.vmdk", create("vmdk", "-o", "subformat=monolithicFlat"), ""}, // a text descriptor
		{"stream.vmdk", create("vmdk", "-o", "subformat=streamOptimized"), ""},
		{"dynamic.vhd", create("vpc"), ""},
		{"fixed.vhd", create("vpc", "-o", "subformat=fixed"), ""}, // footer at the end only: raw
		{"a.vhdx", create("vhdx"), ""},
		{"a.vdi", create("vdi"), ""},
		{"a.qed", create("qed"), ""},
		{"a.parallels", create("parallels"), ""},
		{"a.qcow", create("qcow"), ""},
		{"a.luks", create("luks", "--object", "secret,id=s0,data=probe", "-o", "key-secret=s0,iter-time=10"), ""},
		{"a.bochs", func(p string) { probeBochs(t, p) }, ""},
		{"a.cloop", func(p string) { probeCloop(t, p) }, ""},
		// dmg probes by name; qemu-img info fails on these zeroes
		// (no UDIF trailer), which only the dmg driver looks for.
		{"zero.dmg", func(p string) { os.WriteFile(p, make([]byte, 1<<20), 0o644) }, "dmg"},
		{"empty", func(p string) { os.WriteFile(p, nil, 0o644) }, ""},
		// Converted with data, not only created empty.
		{"conv.vmdk", convert("vmdk"), ""},
		{"conv.vhdx", convert("vhdx"), ""},
		{"conv.vdi", convert("vdi"), ""},
		{"conv.qcow2", convert("qcow2"), ""},
	}
	for _, c := range cases {
		c.build(filepath.Join(dir, c.file))
	}
	if out, err := exec.Command("qemu-img", "info", filepath.Join(dir, "zero.dmg")).CombinedOutput(); err == nil || !strings.Contains(string(out), "dmg file") {
		t.Errorf("qemu-img info zero.dmg: %v %s; want the dmg driver's error", err, out)
	}
	before := probeSums(t, dir)
	for _, c := range cases {
		t.Run(c.file, func(t *testing.T) {
			p := filepath.Join(dir, c.file)
			want := c.qemu
			if want == "" {
				want = probeQemuInfo(t, p)["format"].(string)
			}
			switch want {
			case "raw", "qcow2":
				if got := probeNbdgwInfo(t, bin, p).Format; got != want {
					t.Errorf("nbdgw probes %s, qemu-img %s", got, want)
				}
			default:
				probeRefused(t, bin, []string{p + ": image format " + want + " is not supported (nbdgw reads qcow2 and raw", "; use -f raw to read the file as raw"}, "info", p)
				probeRefused(t, bin, []string{"image format " + want + " is not supported"}, "map", p)
			}
			// -f raw reads any of them as raw, as qemu-img -f raw.
			ci := probeNbdgwInfo(t, bin, "-f", "raw", p)
			q := probeQemuInfo(t, "-f", "raw", p)
			if ci.Format != "raw" || float64(ci.VirtualSize) != q["virtual-size"].(float64) {
				t.Errorf("-f raw: nbdgw %s %d bytes, qemu-img -f raw %v bytes", ci.Format, ci.VirtualSize, q["virtual-size"])
			}
		})
	}
	t.Run("map-f-raw", func(t *testing.T) {
		p := filepath.Join(dir, "sparse.vmdk")
		got := runOutput(t, bin, "map", "--output=json", "-f", "raw", p)
		want := runOutput(t, "qemu-img", "map", "--output=json", "-f", "raw", p)
		if !bytes.Equal(got, want) {
			t.Errorf("nbdgw map -f raw:\n%s\nqemu-img map -f raw:\n%s", got, want)
		}
	})
	t.Run("forced", func(t *testing.T) {
		p := filepath.Join(dir, "a.qcow2")
		probeRefused(t, bin, []string{p + ": image format vmdk is not supported (nbdgw reads qcow2 and raw)"}, "info", "-f", "vmdk", p)
		probeRefused(t, bin, []string{`unknown image format "foo" (nbdgw reads qcow2 and raw)`}, "info", "--format", "foo", p)
		if got := probeNbdgwInfo(t, bin, "-f", "raw", p).Format; got != "raw" {
			t.Errorf("-f raw on a qcow2: %s", got)
		}
	})
	probeSame(t, before, probeSums(t, dir))
}

// TestProbeBacking: a backing file is probed when the header records no
// backing format, and a recorded format nbdgw does not read is refused.
func TestProbeBacking(t *testing.T) {
	bin := nbdgwBinary(t)
	dir := t.TempDir()
	p := func(n string) string { return filepath.Join(dir, n) }
	probeQemuImg(t, "create", "-q", "-f", "vmdk", p("b.vmdk"), "1M")
	probeQemuImg(t, "create", "-q", "-f", "raw", p("b.raw"), "1M")
	probeQemuImg(t, "create", "-q", "-f", "qcow2", "-b", "b.vmdk", "-F", "vmdk", p("recorded.qcow2"))
	for _, c := range []struct{ name, backing string }{{"probed.qcow2", "b.vmdk"}, {"probed-raw.qcow2", "b.raw"}} {
		if err := qcow2.Create(p(c.name), qcow2.CreateOptions{Size: 1 << 20, BackingFile: c.backing}); err != nil {
			t.Fatal(err)
		}
	}
	before := probeSums(t, dir)
	backingFormat := func(image string) string {
		var chain []map[string]any
		if err := json.Unmarshal(runOutput(t, "qemu-img", "info", "--output=json", "--backing-chain", "-U", image), &chain); err != nil {
			t.Fatal(err)
		}
		return chain[1]["format"].(string)
	}
	for _, n := range []string{"recorded.qcow2", "probed.qcow2"} {
		f := backingFormat(p(n))
		if f != "vmdk" {
			t.Fatalf("qemu-img: backing of %s is %s", n, f)
		}
		msg := probeRefused(t, bin, []string{"opening backing file " + p("b.vmdk"), "image format vmdk is not supported"}, "info", p(n))
		if strings.Contains(msg, "-f raw") {
			t.Errorf("%s: the -f raw hint is for the opened image only: %s", n, msg)
		}
	}
	var layers []probeInfo
	out := runOutput(t, bin, "info", "--backing-chain", "--output=json", p("probed-raw.qcow2"))
	if err := json.Unmarshal(out, &layers); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if len(layers) != 2 || layers[1].Format != backingFormat(p("probed-raw.qcow2")) {
		t.Errorf("probed raw backing: %+v", layers)
	}
	probeSame(t, before, probeSums(t, dir))
}

// TestProbedRawWrites: a raw image whose format was probed refuses, as
// QEMU does (raw_co_pwritev: EPERM), a write that would make its first
// 512 bytes probe as another format; given -f raw it takes it.
func TestProbedRawWrites(t *testing.T) {
	hardRequire(t, "qemu-io")
	bin := nbdgwBinary(t)
	dir := t.TempDir()
	img, hdr, q := filepath.Join(dir, "r.img"), filepath.Join(dir, "hdr.bin"), filepath.Join(dir, "q.qcow2")
	probeQemuImg(t, "create", "-q", "-f", "raw", img, "1M")
	probeQemuImg(t, "create", "-q", "-f", "qcow2", q, "1M")
	b, err := os.ReadFile(q)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(hdr, b[:512], 0o644); err != nil {
		t.Fatal(err)
	}
	qemuIO := func(target string, args ...string) (string, error) {
		out, err := exec.Command("qemu-io", append(args, target)...).CombinedOutput()
		return string(out), err
	}
	// The oracle: qemu-io on the file, its format probed.
	if out, err := qemuIO(img, "-c", "write -s "+hdr+" 0 512"); err == nil || !strings.Contains(out, "Operation not permitted") {
		t.Fatalf("qemu-io probed raw, qcow2 header at 0: %v %s", err, out)
	}
	s, r := hardServe(t, bin, "--writable", img)
	if s == nil {
		t.Fatalf("serve: %v", r)
	}
	if out, err := qemuIO(s.uri, "-f", "raw", "-c", "write -s "+hdr+" 0 512"); err == nil || !strings.Contains(out, "Operation not permitted") {
		t.Errorf("nbdgw serve --writable (probed raw), qcow2 header at 0: %v %s; want EPERM as QEMU", err, out)
	}
	if out, err := qemuIO(s.uri, "-f", "raw", "-c", "write -s "+hdr+" 512 512", "-c", "write -P 7 0 512"); err != nil {
		t.Errorf("writes that keep it raw: %v %s", err, out)
	}
	r = s.stop(t)
	if !strings.Contains(string(r.stderr), "probing guessed raw") {
		t.Errorf("serve stderr lacks the probed-raw warning: %s", r.stderr)
	}
	got, _ := os.ReadFile(img)
	if !bytes.Equal(got[:512], bytes.Repeat([]byte{7}, 512)) || !bytes.Equal(got[512:1024], b[:512]) {
		t.Errorf("r.img sector 0/1 not as written")
	}
	s, r = hardServe(t, bin, "--writable", "-f", "raw", img)
	if s == nil {
		t.Fatalf("serve -f raw: %v", r)
	}
	if out, err := qemuIO(s.uri, "-f", "raw", "-c", "write -s "+hdr+" 0 512"); err != nil {
		t.Errorf("serve --writable -f raw, qcow2 header at 0: %v %s", err, out)
	}
	s.stop(t)
	if got, _ := os.ReadFile(img); !bytes.Equal(got[:512], b[:512]) {
		t.Errorf("-f raw: header not written")
	}
}

// TestConfine: with --confine every file of the chain must resolve inside
// the directory and be a regular file; without it nbdgw follows the
// names as QEMU does.
func TestConfine(t *testing.T) {
	bin := nbdgwBinary(t)
	root := t.TempDir()
	in, out := filepath.Join(root, "in"), filepath.Join(root, "out")
	os.Mkdir(in, 0o755)
	os.Mkdir(out, 0o755)
	p := func(n string) string { return filepath.Join(in, n) }
	probeQemuImg(t, "create", "-q", "-f", "qcow2", filepath.Join(out, "base.qcow2"), "1M")
	probeQemuImg(t, "create", "-q", "-f", "qcow2", p("inbase.qcow2"), "1M")
	probeQemuImg(t, "create", "-q", "-f", "qcow2", "-b", "../out/base.qcow2", "-F", "qcow2", p("up.qcow2"))
	if err := os.Symlink("../out/base.qcow2", p("link.qcow2")); err != nil {
		t.Fatal(err)
	}
	probeQemuImg(t, "create", "-q", "-f", "qcow2", "-u", "-b", "link.qcow2", "-F", "qcow2", p("vialink.qcow2"), "1M")
	probeQemuImg(t, "create", "-q", "-f", "qcow2", "-b", p("inbase.qcow2"), "-F", "qcow2", p("abs.qcow2"))
	if err := unix.Mkfifo(p("fifo"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := qcow2.Create(p("fifo.qcow2"), qcow2.CreateOptions{Size: 1 << 20, BackingFile: "fifo", BackingFormat: "raw"}); err != nil {
		t.Fatal(err)
	}
	data := filepath.Join(out, "data.raw")
	probeQemuImg(t, "create", "-q", "-f", "qcow2", "-o", "data_file="+data, p("df.qcow2"), "1M")
	if err := os.Symlink("../out/base.qcow2", p("toplink.qcow2")); err != nil {
		t.Fatal(err)
	}
	before := probeSums(t, root)
	realOut, _ := filepath.EvalSymlinks(out)
	realIn, _ := filepath.EvalSymlinks(in)

	// Without --confine: QEMU's behaviour.
	for _, n := range []string{"up.qcow2", "vialink.qcow2", "abs.qcow2", "df.qcow2", "toplink.qcow2"} {
		probeNbdgwInfo(t, bin, p(n))
		runOutput(t, "qemu-img", "info", p(n))
	}
	outside := "outside the confinement directory " + realIn
	probeRefused(t, bin, []string{`: backing file name "../out/base.qcow2" (header of ` + p("up.qcow2") + ") resolves to " + filepath.Join(realOut, "base.qcow2") + ", " + outside}, "info", "--confine", p("up.qcow2"))
	probeRefused(t, bin, []string{`backing file name "link.qcow2"`, "resolves to " + filepath.Join(realOut, "base.qcow2"), outside}, "info", "--confine", p("vialink.qcow2"))
	probeRefused(t, bin, []string{`backing file name "fifo"`, "not a regular file"}, "info", "--confine", p("fifo.qcow2"))
	// --no-backing does not hide the external data file: it is part of
	// the top layer.
	probeRefused(t, bin, []string{`data file name "` + data + `"`, outside}, "info", "--confine", "--no-backing", p("df.qcow2"))
	probeRefused(t, bin, []string{": image " + p("toplink.qcow2") + " resolves to " + filepath.Join(realOut, "base.qcow2"), outside}, "map", "--confine", p("toplink.qcow2"))
	probeRefused(t, bin, []string{outside}, "serve", "--socket", filepath.Join(root, "s"), "--confine", p("up.qcow2"))
	// Inside: accepted, and --confine=DIR widens it.
	if ci := probeNbdgwInfo(t, bin, "--confine", p("abs.qcow2")); len(ci.Nbdgw.Layers) != 2 {
		t.Errorf("abs.qcow2 --confine: %d layers", len(ci.Nbdgw.Layers))
	}
	if ci := probeNbdgwInfo(t, bin, "--confine="+root, p("vialink.qcow2")); len(ci.Nbdgw.Layers) != 2 {
		t.Errorf("--confine=root vialink.qcow2: %d layers", len(ci.Nbdgw.Layers))
	}
	if ci := probeNbdgwInfo(t, bin, "--confine="+root, p("df.qcow2")); ci.Nbdgw.DataFileOpened != data {
		t.Errorf("--confine=root df.qcow2: data file %q", ci.Nbdgw.DataFileOpened)
	}
	probeSame(t, before, probeSums(t, root))
}

// TestWritableNoBackingBeforeLocks: the refusal comes from the engine
// before any lock is asked for, so a QEMU process holding the image does
// not change the answer, and no file changes.
func TestWritableNoBackingBeforeLocks(t *testing.T) {
	hardRequire(t, "qemu-io")
	bin := nbdgwBinary(t)
	dir := t.TempDir()
	base, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	probeQemuImg(t, "create", "-q", "-f", "qcow2", base, "1M")
	probeQemuImg(t, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
	before := probeSums(t, dir)
	holder := exec.Command("qemu-io", top)
	stdin, err := holder.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { stdin.Close(); holder.Wait() }()
	time.Sleep(300 * time.Millisecond) // qemu-io has opened and locked the image
	want := []string{"--writable --no-backing: " + top + ` has a backing file ("base.qcow2")`}
	probeRefused(t, bin, want, "serve", "--socket", filepath.Join(dir, "s"), "--writable", "--no-backing", top)
	mnt := filepath.Join(dir, "mnt")
	os.Mkdir(mnt, 0o755)
	probeRefused(t, bin, want, "mount", "--writable", "--no-backing", top, mnt)
	probeSame(t, before, probeSums(t, dir))
}

// TestQuotedNames: names read from an image (backing file name, bitmap
// name) carrying ESC, CR and LF are printed quoted everywhere a person
// reads them, so they cannot forge lines or clear the terminal.
func TestQuotedNames(t *testing.T) {
	bin := nbdgwBinary(t)
	dir := t.TempDir()
	evil := "\x1b[2J\r\nFAKE"
	bname, bm := "b"+evil+".qcow2", "m"+evil
	probeQemuImg(t, "create", "-q", "-f", "qcow2", filepath.Join(dir, bname), "1M")
	probeQemuImg(t, "create", "-q", "-f", "qcow2", "-b", bname, "-F", "qcow2", filepath.Join(dir, "top.qcow2"))
	probeQemuImg(t, "bitmap", "--add", filepath.Join(dir, "top.qcow2"), bm)
	probeQemuImg(t, "bitmap", "--add", filepath.Join(dir, "top.qcow2"), "a/b"+evil)
	if out, err := exec.Command("qemu-io", "-c", "write 0 64k", filepath.Join(dir, bname)).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io: %v %s", err, out)
	}
	top := filepath.Join(dir, "top.qcow2")
	clean := func(what, s string) {
		t.Helper()
		if strings.ContainsAny(s, "\x1b\r") || strings.Contains(s, "\nFAKE") {
			t.Errorf("%s prints a raw name: %q", what, s)
		}
	}
	out, errOut, code := probeRun(t, bin, "info", top)
	clean("info", out+errOut)
	for _, w := range []string{"backing file: " + strconv.Quote(bname), "name: " + strconv.Quote(bm)} {
		if code != 0 || !strings.Contains(out, w) {
			t.Errorf("info: exit %d, want %q in:\n%s", code, w, out)
		}
	}
	out, errOut, _ = probeRun(t, bin, "map", top)
	clean("map", out+errOut)
	if !strings.Contains(out, strconv.Quote(filepath.Join(dir, bname))) {
		t.Errorf("map: File column lacks the quoted name:\n%s", out)
	}
	out, errOut, _ = probeRun(t, bin, "map", "--context", "qemu:dirty-bitmap:nope", top)
	clean("map --context", out+errOut)
	if !strings.Contains(errOut, strconv.Quote("qemu:dirty-bitmap:"+bm)) {
		t.Errorf("map --context: %q", errOut)
	}
	// The FUSE tree: the bitmap's file is one path component.
	m := fuseStart(t, bin, top)
	names, err := os.ReadDir(filepath.Join(m.dir, "maps"))
	if err != nil {
		t.Fatal(err)
	}
	found := map[string]bool{}
	for _, n := range names {
		found[n.Name()] = true
	}
	for _, w := range []string{"dirty-bitmap-" + bm, "dirty-bitmap-a%2Fb" + evil} {
		if !found[w] {
			t.Errorf("maps/ lacks %q: %v", w, found)
		}
		if _, err := os.ReadFile(filepath.Join(m.dir, "maps", w)); err != nil {
			t.Error(err)
		}
	}
	m.cmd.Process.Signal(unix.SIGINT)
	m.wait(t)
	out, errOut, code = probeRun(t, bin, "info", "--backing-chain", top)
	clean("info --backing-chain", out+errOut)
	if w := "image: " + strconv.Quote(filepath.Join(dir, bname)); code != 0 || !strings.Contains(out, w) {
		t.Errorf("info --backing-chain: exit %d, want %q in:\n%s", code, w, out)
	}
	// The backing file gone: the warning, and --backing-chain's one-line
	// error, quote its name.
	os.Remove(filepath.Join(dir, bname))
	out, errOut, code = probeRun(t, bin, "info", top)
	clean("info, backing file gone", out+errOut)
	if w := "backing file " + strconv.Quote(filepath.Join(dir, bname)) + " of " + top + " does not exist"; code != 0 || !strings.Contains(errOut, w) {
		t.Errorf("info, backing file gone: exit %d, want %q in stderr %q", code, w, errOut)
	}
	msg := probeRefused(t, bin, []string{"opening backing file " + strconv.Quote(filepath.Join(dir, bname))}, "info", "--backing-chain", top)
	clean("error", msg)
}

// TestMetadataReadsKeepSeekAnswers: what nbdgw reads to open an image
// and answer block status does not change QEMU's answer for the same
// file afterwards. On ext4 a page cached over an unwritten extent turns
// SEEK_HOLE's hole into data, and QEMU asks SEEK_DATA for raw files and
// for qcow2 images it judges metadata-preallocated.
func TestMetadataReadsKeepSeekAnswers(t *testing.T) {
	bin := nbdgwBinary(t)
	dir := t.TempDir()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	if st.Type != unix.EXT4_SUPER_MAGIC {
		t.Skipf("%s is not ext4 (f_type %#x): unwritten extents read as data there", dir, st.Type)
	}
	evict := func(p string) {
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
			t.Fatal(err)
		}
	}
	// qcow2, metadata preallocated, 4 KiB of data at the start of two
	// 64 KiB clusters whose rest is an unwritten extent (what QEMU's
	// fallocate(ZERO_RANGE) of a fresh cluster leaves), a persistent
	// bitmap. Guest cluster 0 is the host cluster right after the L2
	// table: readahead when reading that table would cache it.
	q := filepath.Join(dir, "pre.qcow2")
	probeQemuImg(t, "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", q, "64M")
	if out, err := exec.Command("qemu-io", "-c", "write -P 0xaa 1M 4k", "-c", "write -P 0xbb 0 4k", q).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io: %v %s", err, out)
	}
	probeQemuImg(t, "bitmap", "--add", q, "bm0")
	var mapped []struct {
		Start  int64 `json:"start"`
		Length int64 `json:"length"`
		Offset int64 `json:"offset"`
	}
	json.Unmarshal(runOutput(t, "qemu-img", "map", "--output=json", q), &mapped)
	f, err := os.OpenFile(q, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range mapped {
		if e.Start == 0 || e.Start == 1<<20 {
			if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_KEEP_SIZE, e.Offset+4096, 60<<10); err != nil {
				t.Fatal(err)
			}
		}
	}
	f.Close()
	// raw: an unwritten extent from the first byte.
	r := filepath.Join(dir, "fa.img")
	f, err = os.Create(r)
	if err != nil {
		t.Fatal(err)
	}
	err = unix.Fallocate(int(f.Fd()), 0, 0, 1<<20)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		file  string
		flags []string // how nbdgw and qemu-img open it
		runs  [][]string
		hole  string // an entry of the map before, proving the hole is seen
	}{
		{q, nil, [][]string{{"map"}, {"map", "--context", "qemu:dirty-bitmap:bm0"}, {"info"}}, `{ "start": 4096, "length": 1044480, "depth": 0, "present": true, "zero": true, "data": true`},
		{q, nil, [][]string{{"map"}}, `{ "start": 1052672, "length": 66056192, "depth": 0, "present": true, "zero": true, "data": true`},
		{r, nil, [][]string{{"map"}, {"info"}}, `{ "start": 0, "length": 1048576, "depth": 0, "present": true, "zero": true, "data": false`},
		{r, []string{"-f", "raw"}, [][]string{{"map"}, {"info"}}, `{ "start": 0, "length": 1048576, "depth": 0, "present": true, "zero": true, "data": false`},
	} {
		qemuMap := func() string {
			// qemu-img's own probe read (readahead) of a raw file
			// caches its first pages: give it the format.
			return string(runOutput(t, "qemu-img", "map", "--output=json", "-f", map[bool]string{true: "raw", false: "qcow2"}[c.file == r], c.file))
		}
		evict(c.file)
		want := qemuMap()
		if !strings.Contains(want, c.hole) {
			t.Fatalf("%s: qemu-img map does not see the unwritten extent as a hole:\n%s", c.file, want)
		}
		for _, run := range c.runs {
			// From a cold cache each time: nbdgw answers as QEMU did,
			// leaves no page of the file cached, and QEMU's answer
			// afterwards is the same. (qemu-img's own readahead
			// depends on what is cached, so "the same pages as
			// before" is the state nbdgw must leave.)
			args := append(append(append([]string{}, run...), c.flags...), c.file)
			if run[0] == "map" && len(run) == 1 {
				args = append([]string{"map", "--output=json"}, args[1:]...)
			}
			evict(c.file)
			got := string(runOutput(t, bin, args...))
			if args[1] == "--output=json" && got != want {
				t.Errorf("nbdgw %q:\n%s\nqemu-img map:\n%s", args, got, want)
			}
			if pages := probeCachedData(t, c.file, [][2]int64{{0, 1 << 62}}); len(pages) > 0 {
				t.Errorf("nbdgw %q left %d pages of the file cached, from %#x", args, len(pages), pages[0])
			}
			if after := qemuMap(); after != want {
				t.Errorf("after nbdgw %q, qemu-img map changed:\n%s\nbefore:\n%s", args, after, want)
			}
		}

	}
}

// probeCachedData lists the pages of the ranges of file that are in the
// page cache (mincore).
func probeCachedData(t *testing.T, file string, ranges [][2]int64) []int64 {
	t.Helper()
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, _ := f.Stat()
	m, err := unix.Mmap(int(f.Fd()), 0, int(fi.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	page := int64(os.Getpagesize())
	vec := make([]byte, (fi.Size()+page-1)/page)
	if _, _, e := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0]))); e != 0 {
		t.Fatal(e)
	}
	var cached []int64
	for _, r := range ranges {
		for p := r[0] / page; p*page < r[1] && p < int64(len(vec)); p++ {
			if vec[p]&1 != 0 {
				cached = append(cached, p*page)
			}
		}
	}
	return cached
}
