package integration

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nbdgw/nbdgw/internal/metactx"
	"github.com/nbdgw/nbdgw/nbdserver/nbdclient"
	"github.com/nbdgw/nbdgw/nbdserver/testcerts"
)

// nbdRequire skips the test when a program is missing.
func nbdRequire(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range append([]string{"qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"}, tools...) {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed: %v", tool, err)
		}
	}
}

// nbdStart starts a server process that listens on sock and stops it
// with SIGTERM at cleanup, checking that it exits cleanly.
func nbdStart(t *testing.T, sock string, name string, args ...string) *exec.Cmd {
	t.Helper()
	cmd, _ := nbdStartLogged(t, sock, name, args...)
	return cmd
}

// nbdStartLogged is nbdStart that also returns the server's standard
// error as it grows (qemu-nbd's --trace output, for one).
func nbdStartLogged(t *testing.T, sock string, name string, args ...string) (*exec.Cmd, *lockedBuffer) {
	t.Helper()
	cmd := exec.Command(name, args...)
	stderr := new(lockedBuffer)
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		err := cmd.Wait()
		if strings.HasSuffix(name, "nbdgw") && err != nil {
			t.Errorf("nbdgw serve after SIGTERM: %v\n%s", err, stderr.String())
		}
	})
	for i := 0; i < 100; i++ {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return cmd, stderr
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s does not listen on %s\n%s", name, sock, stderr.String())
	return nil, nil
}

// nbdImage is one image of the comparison corpus.
type nbdImage struct {
	name      string
	path      string
	noBacking bool
	bitmaps   []string
}

// qemuSpec is how QEMU tools open the image (json: for --no-backing).
func (im nbdImage) qemuSpec() string {
	if !im.noBacking {
		return im.path
	}
	return fmt.Sprintf(`json:{"driver":"qcow2","backing":null,"file":{"driver":"file","filename":%q}}`, im.path)
}

// nbdCorpus builds qcow2 chains of several shapes with QEMU's tools.
func nbdCorpus(t *testing.T, dir string) []nbdImage {
	t.Helper()
	p := func(n string) string { return filepath.Join(dir, n) }
	sh := func(cmds ...[]string) {
		for _, c := range cmds {
			runOutput(t, c[0], c[1:]...)
		}
	}
	// Seed 000: a raw base, a qcow2 top.
	sh([]string{"qemu-img", "create", "-q", p("s0base.raw"), "256K"},
		[]string{"qemu-img", "create", "-q", "-f", "qcow2", "-b", p("s0base.raw"), "-F", "raw", p("s0top.qcow2")},
		[]string{"qemu-io", "-f", "raw", "-c", "w -P 65 0 64k", "-c", "w -P 66 64k 64k", "-c", "w -P 67 128k 64k", p("s0base.raw")},
		[]string{"qemu-io", "-f", "qcow2", "-c", "w -P 69 64k 64k", "-c", "w -z 128k 64k", p("s0top.qcow2")})
	// Three layers, 4 KiB clusters, compressed and zero clusters, a
	// discard, a short middle layer, two bitmaps of different granularity.
	sh([]string{"qemu-img", "create", "-q", "-f", "qcow2", p("c1.qcow2"), "4M"},
		[]string{"qemu-io", "-c", "write -P 1 0 1M", "-c", "write -z 1M 64k", "-c", "write -P 2 3M 512k", p("c1.qcow2")},
		[]string{"qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", p("c1.qcow2"), "-F", "qcow2", p("c2.qcow2"), "2M"},
		[]string{"qemu-io", "-c", "write -c -P 3 64k 64k", "-c", "write -P 4 1500k 12k", "-c", "write -z 90k 4k", "-c", "discard 20k 4k", p("c2.qcow2")},
		[]string{"qemu-img", "create", "-q", "-f", "qcow2", "-b", p("c2.qcow2"), "-F", "qcow2", p("c3.qcow2"), "6M"},
		[]string{"qemu-img", "bitmap", "--add", p("c3.qcow2"), "bm1"},
		[]string{"qemu-img", "bitmap", "--add", "--granularity", "16k", p("c3.qcow2"), "bm2"},
		[]string{"qemu-io", "-c", "write -P 5 2M 5k", "-c", "write -z 5M 128k", "-c", "write -P 6 4M 64k", p("c3.qcow2")})
	// Subclusters over a full backing layer; metadata preallocation; an
	// external raw data file; 512-byte clusters; a size that is no
	// multiple of anything.
	sh([]string{"qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", p("x1.qcow2"), "4M"},
		[]string{"qemu-io", "-c", "write -P 7 0 4M", p("x1.qcow2")},
		[]string{"qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-b", p("x1.qcow2"), "-F", "qcow2", p("x2.qcow2")},
		[]string{"qemu-io", "-c", "write -P 1 4k 8k", "-c", "write -z 100k 2k", "-c", "discard 1M 64k", p("x2.qcow2")},
		[]string{"qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", p("pm.qcow2"), "4M"},
		[]string{"qemu-io", "-c", "write -P 1 1M 64k", p("pm.qcow2")},
		[]string{"qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=" + p("df.raw") + ",data_file_raw=on", p("df.qcow2"), "4M"},
		[]string{"qemu-io", "-c", "write -P 1 0 64k", "-c", "write -P 3 2M 128k", p("df.qcow2")},
		[]string{"qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", p("c512.qcow2"), "1000001"},
		[]string{"qemu-io", "-c", "write -P 1 1000 3000", "-c", "write -z 8k 1k", "-c", "write -P 2 999000 1001", p("c512.qcow2")})
	return []nbdImage{
		{name: "subclusters", path: p("x2.qcow2")},
		{name: "prealloc-metadata", path: p("pm.qcow2")},
		{name: "data-file", path: p("df.qcow2")},
		{name: "512-byte-clusters", path: p("c512.qcow2")},
		{name: "seed000", path: p("s0top.qcow2")},
		{name: "seed000-no-backing", path: p("s0top.qcow2"), noBacking: true},
		{name: "three-layers", path: p("c3.qcow2"), bitmaps: []string{"bm1", "bm2"}},
		{name: "three-layers-no-backing", path: p("c3.qcow2"), noBacking: true, bitmaps: []string{"bm1", "bm2"}},
		{name: "middle-layer", path: p("c2.qcow2")},
	}
}

// nbdPick returns the corpus image called name.
func nbdPick(t *testing.T, corpus []nbdImage, name string) nbdImage {
	t.Helper()
	for _, im := range corpus {
		if im.name == name {
			return im
		}
	}
	t.Fatalf("no corpus image %q", name)
	return nbdImage{}
}

func nbdURI(sock string) string { return "nbd+unix:///?socket=" + sock }

// mapEntry is one nbdinfo --map --json entry.
type mapEntry struct {
	Offset, Length int64
	Type           uint32
}

func nbdMapJSON(t *testing.T, uri, ctx string) []mapEntry {
	t.Helper()
	var es []mapEntry
	if err := json.Unmarshal(runOutput(t, "nbdinfo", "--json", "--map="+ctx, uri), &es); err != nil {
		t.Fatal(err)
	}
	return es
}

// jointFromQemu derives qemu:joint-allocation (seed 000) from qemu-nbd's
// base:allocation and qemu:allocation-depth maps.
func jointFromQemu(base, depth []mapEntry) []mapEntry {
	var out []mapEntry
	i, j := 0, 0
	for i < len(base) && j < len(depth) {
		off := max(base[i].Offset, depth[j].Offset)
		end := min(base[i].Offset+base[i].Length, depth[j].Offset+depth[j].Length)
		f := base[i].Type
		switch d := depth[j].Type; {
		case d == 1:
			f |= metactx.StateLocal
		case d >= 2:
			f |= metactx.StateBacking
		}
		if k := len(out) - 1; k >= 0 && out[k].Type == f && out[k].Offset+out[k].Length == off {
			out[k].Length += end - off
		} else {
			out = append(out, mapEntry{off, end - off, f})
		}
		if end == base[i].Offset+base[i].Length {
			i++
		}
		if end == depth[j].Offset+depth[j].Length {
			j++
		}
	}
	return out
}

// TestNBDContextsMatchQemuNBD serves each corpus image with nbdgw and
// qemu-nbd and compares what real clients see: nbdinfo --map of every
// context (text and JSON), qemu-img map over NBD, nbdcopy's data against
// qemu-img convert; joint-allocation against its derivation from
// qemu-nbd's maps; and nbdgw map NBD-URI against nbdinfo and qemu-img.
func TestNBDContextsMatchQemuNBD(t *testing.T) {
	nbdRequire(t, "nbdcopy")
	bin := nbdgwBinary(t)
	dir := t.TempDir()
	for i, im := range nbdCorpus(t, dir) {
		t.Run(im.name, func(t *testing.T) {
			ours, theirs := filepath.Join(dir, fmt.Sprintf("o%d.sock", i)), filepath.Join(dir, fmt.Sprintf("q%d.sock", i))
			args := []string{"serve", "--socket", ours, im.path}
			if im.noBacking {
				args = append(args, "--no-backing")
			}
			nbdStart(t, ours, bin, args...)
			qargs := []string{"-t", "-e", "8", "-r", "-k", theirs, "-A"}
			for _, b := range im.bitmaps {
				qargs = append(qargs, "-B", b)
			}
			nbdStart(t, theirs, "qemu-nbd", append(qargs, im.qemuSpec())...)
			o, q := nbdURI(ours), nbdURI(theirs)

			ctxs := []string{metactx.BaseAllocation, metactx.AllocationDepth}
			for _, b := range im.bitmaps {
				ctxs = append(ctxs, metactx.DirtyBitmapPrefix+b)
			}
			local := []string{im.path}
			if im.noBacking {
				local = []string{"--no-backing", im.path}
			}
			for _, ctx := range ctxs {
				for _, form := range [][]string{
					{"--map=" + ctx}, {"--json", "--map=" + ctx},
					{"--totals", "--map=" + ctx}, {"--totals", "--json", "--map=" + ctx},
				} {
					want := runOutput(t, "nbdinfo", append(form, q)...)
					if got := runOutput(t, "nbdinfo", append(form, o)...); !bytes.Equal(got, want) {
						t.Errorf("nbdinfo %v:\n got %s\nwant %s", form, got, want)
					}
					if got := runOutput(t, bin, append(mapArgs(form), o)...); !bytes.Equal(got, want) {
						t.Errorf("nbdgw map %v URI:\n got %s\nwant %s", mapArgs(form), got, want)
					}
					if got := runOutput(t, bin, append(mapArgs(form), local...)...); !bytes.Equal(got, want) {
						t.Errorf("nbdgw map %v %v:\n got %s\nwant %s", mapArgs(form), local, got, want)
					}
				}
			}
			wantJoint := jointFromQemu(nbdMapJSON(t, q, metactx.BaseAllocation), nbdMapJSON(t, q, metactx.AllocationDepth))
			if got := nbdMapJSON(t, o, metactx.JointAllocation); !slices.Equal(got, wantJoint) {
				t.Errorf("joint-allocation:\n got %v\nwant %v", got, wantJoint)
			}
			// nbdgw map prints the joint-allocation descriptions nbdinfo
			// does not know, the same for the image and the URI.
			var text strings.Builder
			for _, e := range wantJoint {
				fmt.Fprintf(&text, "%10d  %10d  %3d  %s\n", e.Offset, e.Length, e.Type, metactx.Description(metactx.JointAllocation, e.Type))
			}
			for _, target := range [][]string{{o}, local} {
				args := append([]string{"map", "--context", metactx.JointAllocation}, target...)
				if got := runOutput(t, bin, args...); string(got) != text.String() {
					t.Errorf("nbdgw %v:\n got %s\nwant %s", args, got, text.String())
				}
			}
			for _, out := range []string{"json", "human"} {
				want := runOutput(t, "qemu-img", "map", "--output="+out, q)
				want = bytes.ReplaceAll(want, []byte(theirs), []byte(ours))
				if got := runOutput(t, "qemu-img", "map", "--output="+out, o); !bytes.Equal(got, want) {
					t.Errorf("qemu-img map --output=%s:\n got %s\nwant %s", out, got, want)
				}
				if got := runOutput(t, bin, "map", "--output="+out, o); !bytes.Equal(got, want) {
					t.Errorf("nbdgw map --output=%s URI:\n got %s\nwant %s", out, got, want)
				}
			}
			ref := filepath.Join(dir, fmt.Sprintf("ref%d.raw", i))
			runOutput(t, "qemu-img", "convert", "-O", "raw", im.qemuSpec(), ref)
			want := nbdSum(t, ref)
			for _, conns := range []string{"1", "4"} {
				cp := filepath.Join(dir, fmt.Sprintf("cp%d.raw", i))
				runOutput(t, "nbdcopy", "--connections="+conns, o, cp)
				if got := nbdSum(t, cp); got != want {
					t.Errorf("nbdcopy --connections=%s: sha256 %s, want %s", conns, got, want)
				}
			}
			cv := filepath.Join(dir, fmt.Sprintf("cv%d.raw", i))
			runOutput(t, "qemu-img", "convert", "-O", "raw", o, cv)
			if got := nbdSum(t, cv); got != want {
				t.Errorf("qemu-img convert from nbdgw: sha256 %s, want %s", got, want)
			}
		})
	}
}

// mapArgs turns nbdinfo --map flags into nbdgw map flags.
func mapArgs(form []string) []string {
	args := []string{"map"}
	for _, f := range form {
		if c, ok := strings.CutPrefix(f, "--map="); ok {
			args = append(args, "--context", c)
		} else if f == "--totals" {
			args = append(args, "--totals")
		} else {
			args = append(args, "--output=json")
		}
	}
	return args
}

func nbdSum(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%x", sha256.Sum256(b))
}

// TestNBDSeed000 checks the joint-allocation answer DESIGN.md gives for
// the seed example with the backing file cut off (QEMU never merged the
// context, so there is no QEMU oracle to ask).
func TestNBDSeed000(t *testing.T) {
	nbdRequire(t)
	bin := nbdgwBinary(t)
	dir := t.TempDir()
	im := nbdPick(t, nbdCorpus(t, dir), "seed000-no-backing")
	got := runOutput(t, "nbdinfo", "--map=qemu:joint-allocation", "--", "[", bin, "serve", "--no-backing", im.path, "]")
	want := "         0       65536    3\n     65536       65536    4\n    131072       65536    7\n    196608       65536    3\n"
	if string(got) != want {
		t.Errorf("joint-allocation:\n%s\nwant\n%s", got, want)
	}
}

// TestNBDServeCommand exercises nbdgw serve's command line: TCP with an
// export name, socket activation, TLS, read-only refusals, qemu-io reads
// and nbdfuse.
func TestNBDServeCommand(t *testing.T) {
	nbdRequire(t)
	bin := nbdgwBinary(t)
	dir := t.TempDir()
	im := nbdPick(t, nbdCorpus(t, dir), "three-layers")

	t.Run("writable and snapshot exclusive", func(t *testing.T) {
		out, err := exec.Command(bin, "serve", "--writable", "--snapshot", "--socket", filepath.Join(dir, "w.sock"), im.path).CombinedOutput()
		if err == nil || !strings.Contains(string(out), "exclude each other") {
			t.Errorf("serve --writable --snapshot: %v %s", err, out)
		}
	})
	t.Run("tcp export name", func(t *testing.T) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := l.Addr().String()
		l.Close()
		cmd := exec.Command(bin, "serve", "--listen", addr, "--export-name", "disk1", im.path)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { cmd.Process.Signal(syscall.SIGINT); cmd.Wait() }()
		for i := 0; i < 100; i++ {
			if c, err := net.Dial("tcp", addr); err == nil {
				c.Close()
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		list := string(runOutput(t, "nbdinfo", "--list", "nbd://"+addr))
		for _, want := range []string{`export="disk1"`, "qemu:joint-allocation", "qemu:dirty-bitmap:bm2", "can_multi_conn: true", "is_read_only: true"} {
			if !strings.Contains(list, want) {
				t.Errorf("nbdinfo --list lacks %q:\n%s", want, list)
			}
		}
		size := strings.TrimSpace(string(runOutput(t, "nbdinfo", "--size", "nbd://"+addr+"/disk1")))
		if want := strings.TrimSpace(string(runOutput(t, "nbdinfo", "--size", "--", "[", "qemu-nbd", "-r", im.path, "]"))); size != want {
			t.Errorf("size %s, want %s", size, want)
		}
		var info struct {
			Exports []struct {
				Name     string   `json:"export-name"`
				Size     int64    `json:"export-size"`
				Contexts []string `json:"contexts"`
				ReadOnly bool     `json:"is_read_only"`
			} `json:"exports"`
		}
		if err := json.Unmarshal(runOutput(t, "nbdinfo", "--json", "nbd://"+addr+"/disk1"), &info); err != nil {
			t.Fatal(err)
		}
		wantCtx := []string{metactx.BaseAllocation, metactx.AllocationDepth, metactx.JointAllocation, "qemu:dirty-bitmap:bm1", "qemu:dirty-bitmap:bm2"}
		if len(info.Exports) != 1 || info.Exports[0].Name != "disk1" || !info.Exports[0].ReadOnly || !slices.Equal(info.Exports[0].Contexts, wantCtx) {
			t.Errorf("nbdinfo --json: %+v", info)
		}
		for _, out := range []string{"human", "json"} {
			want := runOutput(t, "qemu-img", "map", "--output="+out, "nbd://"+addr+"/disk1")
			if got := runOutput(t, bin, "map", "--output="+out, "nbd://"+addr+"/disk1"); !bytes.Equal(got, want) {
				t.Errorf("nbdgw map --output=%s over TCP:\n got %s\nwant %s", out, got, want)
			}
		}
		if err := exec.Command("nbdinfo", "nbd://"+addr+"/nosuch").Run(); err == nil {
			t.Error("unknown export name accepted")
		}
	})
	t.Run("socket activation", func(t *testing.T) {
		got := runOutput(t, "nbdinfo", "--map=base:allocation", "--", "[", bin, "serve", im.path, "]")
		want := runOutput(t, "nbdinfo", "--map=base:allocation", "--", "[", "qemu-nbd", "-r", im.path, "]")
		if !bytes.Equal(got, want) {
			t.Errorf("socket-activated map:\n%s\nwant\n%s", got, want)
		}
	})
	t.Run("tls", func(t *testing.T) {
		// With a client certificate and the default verify-peer, and
		// without one where --tls-verify-peer=false allows it.
		for _, withClient := range []bool{true, false} {
			creds := t.TempDir()
			if err := testcerts.Write(creds, withClient); err != nil {
				t.Fatal(err)
			}
			sock := filepath.Join(creds, "tls.sock")
			args := []string{"serve", "--socket", sock, "--tls-creds", creds, "--tls-required"}
			if !withClient {
				args = append(args, "--tls-verify-peer=false")
			}
			nbdStart(t, sock, bin, append(args, im.path)...)
			out := string(runOutput(t, "nbdinfo", "nbds+unix:///?socket="+sock+"&tls-certificates="+creds))
			if !strings.Contains(out, "with TLS") {
				t.Errorf("nbdinfo over TLS (client cert %v):\n%s", withClient, out)
			}
			if err := exec.Command("nbdinfo", nbdURI(sock)).Run(); err == nil {
				t.Error("plain client accepted by --tls-required server")
			}
		}
		// By default a client without a certificate is refused, as
		// qemu-nbd's verify-peer=on refuses it.
		creds, caOnly := t.TempDir(), t.TempDir()
		if err := testcerts.Write(creds, true); err != nil {
			t.Fatal(err)
		}
		for _, f := range []string{"ca-cert.pem"} {
			b, err := os.ReadFile(filepath.Join(creds, f))
			if err != nil {
				t.Fatal(err)
			}
			os.WriteFile(filepath.Join(caOnly, f), b, 0o600)
		}
		sock := filepath.Join(creds, "verify.sock")
		nbdStart(t, sock, bin, "serve", "--socket", sock, "--tls-creds", creds, im.path)
		if out, err := exec.Command("nbdinfo", "nbds+unix:///?socket="+sock+"&tls-certificates="+caOnly).CombinedOutput(); err == nil {
			t.Errorf("client without a certificate accepted:\n%s", out)
		}
	})
	t.Run("qemu-io and nbdfuse", func(t *testing.T) {
		sock := filepath.Join(dir, "io.sock")
		nbdStart(t, sock, bin, "serve", "--socket", sock, im.path)
		out := string(runOutput(t, "qemu-io", "-r", "-f", "raw", "-c", "read -P 5 2M 5k", "-c", "read -P 6 4M 64k", "-c", "read -P 0 5M 128k", "-c", "read -P 1 0 20k", nbdURI(sock)))
		if strings.Count(out, "read ") != 4 || strings.Contains(out, "fail") {
			t.Errorf("qemu-io:\n%s", out)
		}
		nbdFuse(t, nbdURI(sock), im.path)
	})
}

// nbdFuse mounts the export with nbdfuse and compares it with the image.
func nbdFuse(t *testing.T, uri, image string) {
	for _, tool := range []string{"nbdfuse", "fusermount3"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed", tool)
		}
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("no /dev/fuse")
	}
	mnt, pidfile := t.TempDir(), filepath.Join(t.TempDir(), "pid")
	cmd := exec.Command("nbdfuse", "-r", "-P", pidfile, filepath.Join(mnt, "disk"), uri)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { exec.Command("fusermount3", "-u", mnt).Run(); cmd.Wait() }()
	for i := 0; i < 100; i++ {
		if fi, err := os.Stat(pidfile); err == nil && fi.Size() > 0 {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	ref := filepath.Join(t.TempDir(), "ref.raw")
	runOutput(t, "qemu-img", "convert", "-O", "raw", image, ref)
	if got, want := nbdSum(t, filepath.Join(mnt, "disk")), nbdSum(t, ref); got != want {
		t.Errorf("nbdfuse content sha256 %s, want %s", got, want)
	}
}

// TestNBDGoClientInterop runs nbdserver's client against qemu-nbd and
// nbdkit, with and without asking for extended headers, and compares with
// nbdinfo. qemu-nbd 10 grants them (7.2 refused them); Debian 12's nbdkit
// refuses them, so asking must fall back to structured replies.
// TestQEMU10ServerToNbdgwClient proves from qemu-nbd's trace which
// framing was used.
func TestNBDGoClientInterop(t *testing.T) {
	nbdRequire(t, "nbdkit")
	dir := t.TempDir()
	im := nbdPick(t, nbdCorpus(t, dir), "three-layers")
	raw := filepath.Join(dir, "interop.raw")
	runOutput(t, "qemu-img", "convert", "-O", "raw", im.path, raw)
	want, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	qsock, ksock := filepath.Join(dir, "q.sock"), filepath.Join(dir, "k.sock")
	nbdStart(t, qsock, "qemu-nbd", "-t", "-e", "8", "-r", "-k", qsock, "-A", "-B", "bm1", im.path)
	nbdStart(t, ksock, "nbdkit", "-f", "-r", "-U", ksock, "file", raw)
	servers := []struct {
		name string
		uri  string
		ctxs []string
	}{
		{"qemu-nbd", nbdURI(qsock), []string{metactx.BaseAllocation, metactx.AllocationDepth, "qemu:dirty-bitmap:bm1"}},
		{"nbdkit", nbdURI(ksock), []string{metactx.BaseAllocation}},
	}
	for _, s := range servers {
		for _, ext := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/ext=%v", s.name, ext), func(t *testing.T) {
				c, err := nbdclient.Dial(context.Background(), s.uri, nbdclient.Options{StructuredReplies: true, ExtendedHeaders: ext, MetaContexts: s.ctxs})
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				got := make([]byte, c.Size())
				if _, err := c.ReadAt(got, 0); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, want) {
					t.Error("content differs from qemu-img convert")
				}
				for _, ctx := range s.ctxs {
					var es []mapEntry
					err := c.BlockStatus(context.Background(), ctx, 0, c.Size(), func(off, n int64, f uint32) error {
						if k := len(es) - 1; k >= 0 && es[k].Type == f && es[k].Offset+es[k].Length == off {
							es[k].Length += n
						} else {
							es = append(es, mapEntry{off, n, f})
						}
						return nil
					})
					if err != nil {
						t.Fatal(err)
					}
					if want := nbdMapJSON(t, s.uri, ctx); !slices.Equal(es, want) {
						t.Errorf("%s:\n got %v\nwant %v", ctx, es, want)
					}
				}
			})
		}
	}
}
