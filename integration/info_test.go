package integration

import (
	"bytes"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// infoImage is one image of the nbdgw info corpus, named relative to
// the corpus directory (both tools run there).
type infoImage struct {
	name string
	// noHuman: the name is not printable, so nbdgw's human output quotes
	// it where qemu-img prints it raw; only the JSON is compared.
	noHuman bool
}

// infoCorpus builds, with qemu-img and qemu-io, an image for each kind
// of fact qemu-img info reports.
func infoCorpus(t *testing.T, dir string) []infoImage {
	t.Helper()
	run := func(args ...string) {
		t.Helper()
		cmd := exec.Command(args[0], args[1:]...)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%q: %v\n%s", args, err, out)
		}
	}
	create := func(name, size string, opts ...string) {
		t.Helper()
		run(append(append([]string{"qemu-img", "create", "-q"}, opts...), name, size)...)
	}
	write := func(name string, cmds ...string) {
		t.Helper()
		args := []string{"qemu-io", "-f", "qcow2"}
		for _, c := range cmds {
			args = append(args, "-c", c)
		}
		run(append(args, name)...)
	}
	create("raw.img", "1M", "-f", "raw")
	run("qemu-io", "-f", "raw", "-c", "write -P 7 64k 64k", "raw.img")
	if err := os.WriteFile(filepath.Join(dir, "odd.raw"), bytes.Repeat([]byte{1}, 1000001), 0o644); err != nil {
		t.Fatal(err)
	}
	create("v2.qcow2", "1M", "-f", "qcow2", "-o", "compat=0.10")
	write("v2.qcow2", "write -P 1 0 64k")
	create("zlib.qcow2", "2M", "-f", "qcow2", "-o", "compression_type=zlib")
	write("zlib.qcow2", "write -c -P 2 0 64k", "write -P 3 1M 64k")
	create("zstd.qcow2", "2M", "-f", "qcow2", "-o", "compression_type=zstd")
	write("zstd.qcow2", "write -c -P 2 0 128k")
	create("el2.qcow2", "3M", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=128k")
	write("el2.qcow2", "write -P 4 4k 4k")
	create("big-cluster.qcow2", "16M", "-f", "qcow2", "-o", "cluster_size=2M,refcount_bits=1,lazy_refcounts=on")
	create("bitmaps.qcow2", "4M", "-f", "qcow2")
	run("qemu-img", "bitmap", "--add", "bitmaps.qcow2", "b0")
	run("qemu-img", "bitmap", "--add", "-g", "128k", "--disable", "bitmaps.qcow2", "b1")
	write("bitmaps.qcow2", "write -P 5 0 64k")
	create("datafile.qcow2", "1M", "-f", "qcow2", "-o", "data_file=datafile.raw,data_file_raw=on")
	write("datafile.qcow2", "write -P 6 0 64k")
	create("base.qcow2", "4M", "-f", "qcow2")
	write("base.qcow2", "write -P 8 0 1M")
	create("mid.qcow2", "4M", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2")
	write("mid.qcow2", "write -P 9 1M 1M")
	create("top.qcow2", "4M", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2")
	create("rawbacked.qcow2", "1M", "-f", "qcow2", "-b", "raw.img", "-F", "raw")
	create("missing.qcow2", "1M", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2")
	create("snapshot.qcow2", "1M", "-f", "qcow2")
	write("snapshot.qcow2", "write -P 10 0 64k")
	run("qemu-img", "snapshot", "-c", "first", "snapshot.qcow2")
	write("snapshot.qcow2", "write -P 11 0 64k")
	run("qemu-img", "snapshot", "-c", "second-with-a-long-name", "snapshot.qcow2")
	create("odd.qcow2", "1000000", "-f", "qcow2")
	// Killed while writing: the dirty bit (lazy refcounts) and an in-use
	// bitmap stay set.
	create("dirty.qcow2", "1M", "-f", "qcow2", "-o", "lazy_refcounts=on")
	run("qemu-img", "bitmap", "--add", "dirty.qcow2", "b0")
	cmd := exec.Command("qemu-io", "-f", "qcow2", "-c", "write 0 64k", "-c", "sigraise 9", "dirty.qcow2")
	cmd.Dir = dir
	cmd.Run() // killed by its own signal
	// A name QEMU's JSON escapes: control characters, non-ASCII past
	// the BMP (surrogate pairs).
	weird := "w\x01é💾\"\\.qcow2"
	create(weird, "1M", "-f", "qcow2")
	return []infoImage{
		{name: "raw.img"}, {name: "odd.raw"}, {name: "v2.qcow2"}, {name: "zlib.qcow2"}, {name: "zstd.qcow2"},
		{name: "el2.qcow2"}, {name: "big-cluster.qcow2"}, {name: "bitmaps.qcow2"}, {name: "datafile.qcow2"},
		{name: "base.qcow2"}, {name: "mid.qcow2"}, {name: "top.qcow2"}, {name: "rawbacked.qcow2"},
		{name: "missing.qcow2"}, {name: "snapshot.qcow2"}, {name: "odd.qcow2"}, {name: "dirty.qcow2"},
		{name: weird, noHuman: true},
	}
}

// infoRun runs a program in dir and returns its exit code and output.
func infoRun(t *testing.T, dir, name string, args ...string) (code int, stdout, stderr []byte) {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode(), o.Bytes(), e.Bytes()
	} else if err != nil {
		t.Fatal(err)
	}
	return 0, o.Bytes(), e.Bytes()
}

// infoNbdgwMember matches the start of the "nbdgw" member nbdgw adds
// last to each image object, capturing its indentation.
var infoNbdgwMember = regexp.MustCompile(`,\n( *)"nbdgw": \{`)

// infoStripNbdgw removes every "nbdgw" member from nbdgw's JSON text:
// what remains must be qemu-img's text byte for byte.
func infoStripNbdgw(t *testing.T, b []byte) []byte {
	t.Helper()
	for {
		m := infoNbdgwMember.FindSubmatchIndex(b)
		if m == nil {
			return b
		}
		end := []byte("\n" + string(b[m[2]:m[3]]) + "}")
		j := bytes.Index(b[m[1]:], end)
		if j < 0 {
			t.Fatalf("unterminated nbdgw member in:\n%s", b)
		}
		b = append(b[:m[0]:m[0]], b[m[1]+j+len(end):]...)
	}
}

// infoNbdgwPart is what nbdgw adds under "nbdgw".
type infoNbdgwPart struct {
	Depth   int      `json:"depth"`
	Version int      `json:"qcow2-version"`
	Missing string   `json:"missing-backing-file"`
	Layers  []string // filenames of "layers"
}

func infoNbdgwParts(t *testing.T, b []byte, chain bool) []infoNbdgwPart {
	t.Helper()
	type part struct {
		Nbdgw struct {
			Depth   int    `json:"depth"`
			Version int    `json:"qcow2-version"`
			Missing string `json:"missing-backing-file"`
			Layers  []struct {
				Filename string `json:"filename"`
			} `json:"layers"`
		} `json:"nbdgw"`
	}
	var parts []part
	if chain {
		if err := json.Unmarshal(b, &parts); err != nil {
			t.Fatalf("%v:\n%s", err, b)
		}
	} else {
		parts = make([]part, 1)
		if err := json.Unmarshal(b, &parts[0]); err != nil {
			t.Fatalf("%v:\n%s", err, b)
		}
	}
	var out []infoNbdgwPart
	for _, p := range parts {
		q := infoNbdgwPart{Depth: p.Nbdgw.Depth, Version: p.Nbdgw.Version, Missing: p.Nbdgw.Missing}
		for _, l := range p.Nbdgw.Layers {
			q.Layers = append(q.Layers, l.Filename)
		}
		out = append(out, q)
	}
	return out
}

// TestInfoMatchesQemuImg compares nbdgw info with qemu-img info of QEMU
// 10 for every image of the corpus, in both output forms, with and
// without --backing-chain: the JSON byte for byte once nbdgw's own
// "nbdgw" members are taken out, the human output byte for byte. A
// wrong virtual size, cluster size, key, order or spacing fails here.
func TestInfoMatchesQemuImg(t *testing.T) {
	t.Parallel()
	hardRequire(t, "qemu-img", "qemu-io")
	bin := nbdgwBinary(t)
	dir := t.TempDir()
	corpus := infoCorpus(t, dir)
	for _, im := range corpus {
		t.Run(im.name, func(t *testing.T) {
			for _, chain := range []bool{false, true} {
				if chain && im.name == "missing.qcow2" {
					continue // TestInfoMissingBacking
				}
				for _, output := range []string{"json", "human"} {
					if output == "human" && im.noHuman {
						continue
					}
					args := []string{"info", "--output=" + output}
					if chain {
						args = append(args, "--backing-chain")
					}
					args = append(args, im.name)
					qcode, want, qerr := infoRun(t, dir, "qemu-img", args...)
					if qcode != 0 {
						t.Fatalf("qemu-img %q: exit %d: %s", args, qcode, qerr)
					}
					code, got, stderr := infoRun(t, dir, bin, args...)
					if code != 0 {
						t.Fatalf("nbdgw %q: exit %d: %s", args, code, stderr)
					}
					if output == "json" {
						// Both must parse as the same values, and be the same text.
						var wv, gv any
						stripped := infoStripNbdgw(t, got)
						if err := json.Unmarshal(want, &wv); err != nil {
							t.Fatal(err)
						}
						if err := json.Unmarshal(stripped, &gv); err != nil {
							t.Fatalf("nbdgw %q: %v\n%s", args, err, got)
						}
						if !reflect.DeepEqual(wv, gv) {
							t.Errorf("nbdgw %q: values differ from qemu-img's:\n%s\nqemu-img:\n%s", args, stripped, want)
						} else if !bytes.Equal(stripped, want) {
							t.Errorf("nbdgw %q: same values, different text (key order, spacing or escaping):\n%s\nqemu-img:\n%s", args, stripped, want)
						}
						infoCheckNbdgwPart(t, dir, im.name, chain, got)
					} else if !bytes.Equal(got, want) {
						t.Errorf("nbdgw %q:\n%s\nqemu-img:\n%s", args, got, want)
					}
				}
			}
		})
	}
	// The same chain named by an absolute path: the backing file's
	// "actual path" differs from its name.
	t.Run("absolute", func(t *testing.T) {
		top := filepath.Join(dir, "top.qcow2")
		for _, args := range [][]string{{"info", top}, {"info", "--backing-chain", top}} {
			want := runOutput(t, "qemu-img", args...)
			got := runOutput(t, bin, args...)
			if !bytes.Equal(got, want) {
				t.Errorf("nbdgw %q:\n%s\nqemu-img:\n%s", args, got, want)
			}
			if !bytes.Contains(got, []byte("(actual path: "+filepath.Join(dir, "mid.qcow2")+")")) {
				t.Errorf("nbdgw %q does not show the actual path of mid.qcow2:\n%s", args, got)
			}
		}
	})
}

// infoCheckNbdgwPart checks the "nbdgw" members against the chain
// qemu-img --backing-chain reports.
func infoCheckNbdgwPart(t *testing.T, dir, name string, chain bool, got []byte) {
	t.Helper()
	var qemuChain []struct {
		Filename string `json:"filename"`
		Format   string `json:"format"`
	}
	if name != "missing.qcow2" {
		if err := json.Unmarshal(runOutputIn(t, dir, "qemu-img", "info", "--backing-chain", "--output=json", name), &qemuChain); err != nil {
			t.Fatal(err)
		}
	}
	parts := infoNbdgwParts(t, got, chain)
	for i, p := range parts {
		if p.Depth != i+1 {
			t.Errorf("%s: object %d has nbdgw depth %d", name, i, p.Depth)
		}
		if want := map[bool]string{true: "gone.qcow2"}[name == "missing.qcow2" && !chain]; p.Missing != want {
			t.Errorf("%s: missing-backing-file %q, want %q", name, p.Missing, want)
		}
	}
	if chain {
		if len(parts) != len(qemuChain) {
			t.Errorf("%s: %d objects, qemu-img --backing-chain %d", name, len(parts), len(qemuChain))
		}
		return
	}
	var want []string
	for _, l := range qemuChain {
		want = append(want, l.Filename)
	}
	if name == "missing.qcow2" {
		want = []string{name}
	}
	if !reflect.DeepEqual(parts[0].Layers, want) {
		t.Errorf("%s: nbdgw layers %q, qemu-img --backing-chain %q", name, parts[0].Layers, want)
	}
}

// runOutputIn is runOutput in dir.
func runOutputIn(t *testing.T, dir, name string, args ...string) []byte {
	t.Helper()
	code, out, stderr := infoRun(t, dir, name, args...)
	if code != 0 {
		t.Fatalf("%s %q: exit %d\n%s", name, args, code, stderr)
	}
	return out
}

// TestInfoMissingBacking: as qemu-img info, nbdgw info shows an image
// whose backing file is gone (same stdout), and says on stderr that it
// is missing; --backing-chain fails, as qemu-img's does.
func TestInfoMissingBacking(t *testing.T) {
	t.Parallel()
	hardRequire(t, "qemu-img")
	bin := nbdgwBinary(t)
	dir := t.TempDir()
	runOutputIn(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", "top.qcow2", "1M")
	for _, output := range []string{"human", "json"} {
		want := runOutputIn(t, dir, "qemu-img", "info", "--output="+output, "top.qcow2")
		code, got, stderr := infoRun(t, dir, bin, "info", "--output="+output, "top.qcow2")
		if output == "json" {
			got = infoStripNbdgw(t, got)
		}
		if code != 0 || !bytes.Equal(got, want) {
			t.Errorf("--output=%s: exit %d, stdout:\n%s\nqemu-img:\n%s", output, code, got, want)
		}
		if w := "nbdgw: warning: backing file gone.qcow2 of top.qcow2 does not exist\n"; string(stderr) != w {
			t.Errorf("--output=%s: stderr %q, want %q", output, stderr, w)
		}
	}
	for _, output := range []string{"human", "json"} {
		qcode, _, _ := infoRun(t, dir, "qemu-img", "info", "--backing-chain", "--output="+output, "top.qcow2")
		code, stdout, stderr := infoRun(t, dir, bin, "info", "--backing-chain", "--output="+output, "top.qcow2")
		w := "nbdgw info: opening backing file gone.qcow2 (depth 2) of top.qcow2: open gone.qcow2: no such file or directory\n"
		if qcode != 1 || code != 1 || len(stdout) != 0 || string(stderr) != w {
			t.Errorf("--backing-chain --output=%s: exit %d (qemu-img %d), stdout %q, stderr %q, want %q", output, code, qcode, stdout, stderr, w)
		}
	}
	// Deeper: top2 -> mid2 -> gone2. qemu-img shows top2; nbdgw too, and
	// says which layer names the missing file.
	runOutputIn(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "gone2.qcow2", "-F", "qcow2", "mid2.qcow2", "1M")
	runOutputIn(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "mid2.qcow2", "-F", "qcow2", "top2.qcow2", "1M")
	want := runOutputIn(t, dir, "qemu-img", "info", "--output=json", "top2.qcow2")
	code, got, stderr := infoRun(t, dir, bin, "info", "--output=json", "top2.qcow2")
	if code != 0 || !bytes.Equal(infoStripNbdgw(t, got), want) {
		t.Errorf("top2: exit %d, stdout:\n%s\nqemu-img:\n%s", code, got, want)
	}
	if w := "nbdgw: warning: backing file gone2.qcow2 of mid2.qcow2 does not exist\n"; string(stderr) != w {
		t.Errorf("top2: stderr %q, want %q", stderr, w)
	}
	if p := infoNbdgwParts(t, got, false)[0]; !reflect.DeepEqual(p.Layers, []string{"top2.qcow2", "mid2.qcow2"}) || p.Missing != "gone2.qcow2" {
		t.Errorf("top2: nbdgw part %+v", p)
	}

	// With the backing file back, the warning goes and the chain shows.
	runOutputIn(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "gone.qcow2", "1M")
	code, _, stderr = infoRun(t, dir, bin, "info", "top.qcow2")
	if code != 0 || len(stderr) != 0 {
		t.Errorf("backing file back: exit %d, stderr %q", code, stderr)
	}
}

// TestInfoNBDURI: nbdgw info of an NBD URI prints what qemu-img info
// prints for it, against qemu-nbd and against nbdgw serve.
func TestInfoNBDURI(t *testing.T) {
	t.Parallel()
	hardRequire(t, "qemu-img", "qemu-nbd")
	bin := nbdgwBinary(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "img.qcow2")
	runOutput(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "3M")
	servers := []struct {
		name string
		uri  string
	}{}
	s1 := filepath.Join(dir, "q.sock")
	nbdStart(t, s1, "qemu-nbd", "-t", "-r", "-f", "qcow2", "-k", s1, "-x", "exp", img)
	servers = append(servers, struct{ name, uri string }{"qemu-nbd", "nbd+unix:///exp?socket=" + s1})
	s2 := filepath.Join(dir, "n.sock")
	nbdStart(t, s2, bin, "serve", "--socket", s2, img)
	servers = append(servers, struct{ name, uri string }{"nbdgw-serve", nbdURI(s2)})
	// TCP, with an export name: QEMU names the node nbd://HOST:PORT/NAME.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	srv := exec.Command(bin, "serve", "--listen", addr, "--export-name", "disk1", img)
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Process.Signal(syscall.SIGTERM); srv.Wait() })
	for i := 0; ; i++ {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
			break
		}
		if i == 100 {
			t.Fatalf("nbdgw serve --listen %s: %v", addr, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	servers = append(servers, struct{ name, uri string }{"nbdgw-serve-tcp", "nbd://" + addr + "/disk1"})
	for _, s := range servers {
		t.Run(s.name, func(t *testing.T) {
			for _, args := range [][]string{
				{"info", s.uri},
				{"info", "--output=json", s.uri},
				{"info", "--backing-chain", s.uri},
				{"info", "--backing-chain", "--output=json", s.uri},
			} {
				want := runOutput(t, "qemu-img", args...)
				got := runOutput(t, bin, args...)
				if !bytes.Equal(got, want) {
					t.Errorf("nbdgw %q:\n%s\nqemu-img:\n%s", args, got, want)
				}
			}
		})
	}
	// Errors: one line, exit 1 for an unreachable server, 2 for flags
	// that do not apply to an export.
	for _, c := range []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"info", nbdURI(filepath.Join(dir, "none.sock"))}, 1, "nbdgw info: dial unix " + filepath.Join(dir, "none.sock") + ": connect: no such file or directory\n"},
		{[]string{"info", "-f", "qcow2", nbdURI(s2)}, 2, "an NBD export is read as raw"},
		{[]string{"info", "--no-backing", nbdURI(s2)}, 2, "an NBD export is read as raw"},
		{[]string{"info", "--output=xml", nbdURI(s2)}, 2, "--output=xml: want json or human"},
	} {
		code, stdout, stderr := infoRun(t, dir, bin, c.args...)
		if code != c.code || len(stdout) != 0 || !strings.Contains(string(stderr), c.msg) || strings.Count(strings.TrimSuffix(string(stderr), "\n"), "\n") > 1 {
			t.Errorf("nbdgw %q: exit %d, stdout %q, stderr %q; want exit %d and %q", c.args, code, stdout, stderr, c.code, c.msg)
		}
	}
}
