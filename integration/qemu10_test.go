package integration

// Real extended-header peers on both sides: QEMU 10's qemu-img and
// qemu-io as clients of nbdgw serve, qemu-nbd 10 as the server of nbdgw's
// client, and libnbd 1.22 (built by scripts/build-libnbd.sh) for 64-bit
// block status, block status filters and nbdinfo/nbdcopy. Proof that
// extended headers were negotiated comes from the peer: QEMU's log trace
// backend (--trace 'nbd_*') and libnbd's get_extended_headers_negotiated.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nbdgw/nbdgw/internal/metactx"
	"github.com/nbdgw/nbdgw/nbdserver/nbdclient"
	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
)

// qemu10Require skips unless the QEMU tools are 10.x (the oracle).
func qemu10Require(t *testing.T) {
	t.Helper()
	nbdRequire(t)
	out := runOutput(t, "qemu-img", "--version")
	if !bytes.HasPrefix(out, []byte("qemu-img version 10.")) {
		t.Skipf("qemu-img is not QEMU 10: %s", bytes.SplitN(out, []byte("\n"), 2)[0])
	}
}

var (
	libnbdOnce sync.Once
	libnbdDir  string
	libnbdErr  error
)

// libnbdPrefix returns the prefix of libnbd 1.22.2 built by
// scripts/build-libnbd.sh (run once per test process; it returns at once
// when its cache is present), or skips saying why it cannot be had.
func libnbdPrefix(t *testing.T) string {
	t.Helper()
	libnbdOnce.Do(func() {
		cmd := exec.Command("../scripts/build-libnbd.sh")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			tail := stderr.Bytes()
			if len(tail) > 2000 {
				tail = tail[len(tail)-2000:]
			}
			libnbdErr = fmt.Errorf("scripts/build-libnbd.sh: %v\n%s", err, tail)
			return
		}
		libnbdDir = strings.TrimSpace(string(out))
	})
	if libnbdErr != nil {
		t.Skipf("libnbd >= 1.18 cannot be built: %v", libnbdErr)
	}
	return libnbdDir
}

// libnbdCmd runs a program of the libnbd build (python3 sees its nbd
// module).
func libnbdCmd(prefix, name string, args ...string) *exec.Cmd {
	if name != "python3" {
		name = filepath.Join(prefix, "bin", name)
	}
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), "PYTHONPATH="+filepath.Join(prefix, "lib/python3/site-packages"))
	return cmd
}

func cmdOutput(t *testing.T, cmd *exec.Cmd) []byte {
	t.Helper()
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%q: %v\n%s", cmd.Args, err, stderr.Bytes())
	}
	return out
}

// qemuTraced runs a QEMU tool with --trace 'nbd_*' (Debian builds the
// log backend: events go to standard error) and returns stdout and the
// trace.
func qemuTraced(t *testing.T, tool string, args ...string) (stdout, trace []byte) {
	t.Helper()
	cmd := exec.Command(tool, append([]string{"--trace", "nbd_*"}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %q: %v\n%s", tool, args, err, stderr.Bytes())
	}
	return out, stderr.Bytes()
}

// Client-side trace lines: the server acked NBD_OPT_EXTENDED_HEADERS, and
// block status came as NBD_REPLY_TYPE_BLOCK_STATUS_EXT.
const (
	traceClientExtAck   = "Received option reply 11 (extended headers), type 1 (ack)"
	traceClientStatus64 = "type = 6 (block status (64-bit))"
	// Server side (qemu-nbd): the ack, and requests in extended framing.
	traceServerExtAck = "Reply opt=11 (extended headers), type=1 (ack)"
)

// qemu-nbd traces the magic of each request it receives.
var (
	traceServerExtReq     = fmt.Sprintf("magic = %#x", nbdproto.ExtendedRequestMagic)
	traceServerCompactReq = fmt.Sprintf("magic = %#x", nbdproto.RequestMagic)
)

var traceRequest = regexp.MustCompile(`Sending request to server: \{ \.from = (\d+), \.len = (\d+), .*\.type = (\d+)`)

// traceRequests returns the lengths of the requests of type typ a QEMU
// client sent.
func traceRequests(trace []byte, typ int) []uint64 {
	var lens []uint64
	for _, m := range traceRequest.FindAllSubmatch(trace, -1) {
		if n, _ := strconv.Atoi(string(m[3])); n == typ {
			l, _ := strconv.ParseUint(string(m[2]), 10, 64)
			lens = append(lens, l)
		}
	}
	return lens
}

// bigImage builds a 6 GiB qcow2 with data, a zero run and two bitmaps
// past 4 GiB: one 32-bit block status request cannot cover it.
func bigImage(t *testing.T, dir string) nbdImage {
	t.Helper()
	p := filepath.Join(dir, "big.qcow2")
	runOutput(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "6G")
	runOutput(t, "qemu-img", "bitmap", "--add", p, "b1")
	runOutput(t, "qemu-io", "-c", "write -P 1 0 64k", "-c", "write -P 2 4100M 1M", p)
	runOutput(t, "qemu-img", "bitmap", "--add", "--granularity", "128k", p, "b2")
	runOutput(t, "qemu-io", "-c", "write -z 5G 1M", "-c", "write -P 3 6143M 1M", p)
	return nbdImage{name: "6GiB", path: p, bitmaps: []string{"b1", "b2"}}
}

// TestQEMU10ClientsAgainstNbdgw: qemu-img map and convert and qemu-io
// reads and writes over nbd+unix:// against nbdgw serve, each proving in
// its own trace that it negotiated extended headers.
func TestQEMU10ClientsAgainstNbdgw(t *testing.T) {
	qemu10Require(t)
	bin := nbdgwBinary(t)
	dir := t.TempDir()
	images := []nbdImage{nbdPick(t, nbdCorpus(t, dir), "three-layers"), bigImage(t, dir)}
	for i, im := range images {
		t.Run(im.name, func(t *testing.T) {
			ours, theirs := filepath.Join(dir, fmt.Sprintf("o%d.sock", i)), filepath.Join(dir, fmt.Sprintf("q%d.sock", i))
			nbdStart(t, ours, bin, "serve", "--socket", ours, im.path)
			nbdStart(t, theirs, "qemu-nbd", "-t", "-r", "-k", theirs, im.path)
			o, q := nbdURI(ours), nbdURI(theirs)
			for _, out := range []string{"json", "human"} {
				want := runOutput(t, "qemu-img", "map", "--output="+out, q)
				want = bytes.ReplaceAll(want, []byte(theirs), []byte(ours))
				got, trace := qemuTraced(t, "qemu-img", "map", "--output="+out, o)
				if !bytes.Equal(got, want) {
					t.Errorf("qemu-img map --output=%s of nbdgw:\n got %s\nwant %s", out, got, want)
				}
				if !bytes.Contains(trace, []byte(traceClientExtAck)) || !bytes.Contains(trace, []byte(traceClientStatus64)) {
					t.Errorf("qemu-img map: no extended headers in the trace:\n%s", trace)
				}
				// One request may now span more than 4 GiB.
				if lens := traceRequests(trace, int(nbdproto.CmdBlockStatus)); len(lens) == 0 || (im.name == "6GiB" && slices.Max(lens) <= 1<<32) {
					t.Errorf("qemu-img map: block status requests %v", lens)
				}
				// nbdgw's client prints the same map, of nbdgw and of qemu-nbd.
				if got := runOutput(t, bin, "map", "--output="+out, o); !bytes.Equal(got, want) {
					t.Errorf("nbdgw map --output=%s of nbdgw:\n got %s\nwant %s", out, got, want)
				}
				wantQ := bytes.ReplaceAll(want, []byte(ours), []byte(theirs))
				if got := runOutput(t, bin, "map", "--output="+out, q); !bytes.Equal(got, wantQ) {
					t.Errorf("nbdgw map --output=%s of qemu-nbd:\n got %s\nwant %s", out, got, wantQ)
				}
			}
			// convert writes a sparse raw file where block status says zero;
			// compare checks it against the image without reading the holes.
			cv := filepath.Join(dir, fmt.Sprintf("cv%d.raw", i))
			_, trace := qemuTraced(t, "qemu-img", "convert", "-O", "raw", o, cv)
			if !bytes.Contains(trace, []byte(traceClientExtAck)) || len(traceRequests(trace, int(nbdproto.CmdRead))) == 0 {
				t.Errorf("qemu-img convert: no extended reads in the trace:\n%.4000s", trace)
			}
			if out, err := exec.Command("qemu-img", "compare", "-f", "raw", cv, im.path).CombinedOutput(); err != nil {
				t.Errorf("qemu-img convert from nbdgw differs from the image: %v\n%s", err, out)
			}
			os.Remove(cv)
		})
	}

	// qemu-io reads and writes through nbdgw serve --writable; the same
	// commands run by qemu-io on a copy give the same image.
	t.Run("qemu-io writes", func(t *testing.T) {
		base := nbdPick(t, nbdCorpus(t, t.TempDir()), "three-layers")
		w1, w2 := filepath.Join(dir, "w1.qcow2"), filepath.Join(dir, "w2.qcow2")
		runOutput(t, "qemu-img", "convert", "-O", "qcow2", base.path, w1)
		runOutput(t, "qemu-img", "convert", "-O", "qcow2", base.path, w2)
		cmds := []string{"-c", "write -P 9 1M 192k", "-c", "write -z 2M 64k", "-c", "discard 4M 64k", "-c", "write -P 10 5000k 3k", "-c", "flush",
			"-c", "read -P 9 1M 192k", "-c", "read -P 0 2M 64k", "-c", "read -P 10 5000k 3k"}
		t.Run("serve", func(t *testing.T) {
			sock := filepath.Join(dir, "w.sock")
			nbdStart(t, sock, bin, "serve", "--writable", "--socket", sock, w1)
			out, trace := qemuTraced(t, "qemu-io", append([]string{"-f", "raw"}, append(cmds, nbdURI(sock))...)...)
			if strings.Count(string(out), "wrote ") != 3 || strings.Count(string(out), "read ") != 3 || strings.Contains(string(out), "fail") {
				t.Errorf("qemu-io:\n%s", out)
			}
			if !bytes.Contains(trace, []byte(traceClientExtAck)) || len(traceRequests(trace, int(nbdproto.CmdWrite))) != 2 ||
				len(traceRequests(trace, int(nbdproto.CmdWriteZeroes))) != 1 || len(traceRequests(trace, int(nbdproto.CmdTrim))) != 1 {
				t.Errorf("qemu-io: trace lacks extended headers or the writes:\n%.6000s", trace)
			}
		})
		runOutput(t, "qemu-io", append(cmds, w2)...)
		if out, err := exec.Command("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", w1, w2).CombinedOutput(); err != nil {
			t.Errorf("qemu-img compare after writes through nbdgw: %v\n%s", err, out)
		}
	})
}

// TestQEMU10ServerToNbdgwClient: nbdgw map --context CTX of qemu-nbd 10
// (-A -B) for every context, 64-bit (nbdgw map, extended headers) and
// 32-bit (the same client without them, as nbdgw attach uses it), against
// nbdinfo 1.14 (32-bit) and 1.22 (64-bit); qemu-nbd's own trace proves
// which framing each connection used.
func TestQEMU10ServerToNbdgwClient(t *testing.T) {
	qemu10Require(t)
	bin := nbdgwBinary(t)
	prefix := libnbdPrefix(t)
	dir := t.TempDir()
	images := []nbdImage{nbdPick(t, nbdCorpus(t, dir), "three-layers"), bigImage(t, dir)}
	for i, im := range images {
		t.Run(im.name, func(t *testing.T) {
			sock := filepath.Join(dir, fmt.Sprintf("q%d.sock", i))
			args := []string{"--trace", "nbd_*", "-t", "-r", "-k", sock, "-A"}
			for _, b := range im.bitmaps {
				args = append(args, "-B", b)
			}
			_, trace := nbdStartLogged(t, sock, "qemu-nbd", append(args, im.path)...)
			uri := nbdURI(sock)
			// traced runs f, which makes one connection that ends with
			// NBD_CMD_DISC, and returns what qemu-nbd logged for it (the
			// connections before it have logged their end).
			discs := 0
			settle := func() {
				for i := 0; i < 250 && strings.Count(trace.String(), "type = 2 (disconnect)") < discs; i++ {
					time.Sleep(20 * time.Millisecond)
				}
			}
			traced := func(f func()) string {
				settle()
				mark := len(trace.String())
				f()
				discs++
				settle()
				return trace.String()[mark:]
			}
			ctxs := []string{metactx.BaseAllocation, metactx.AllocationDepth}
			for _, b := range im.bitmaps {
				ctxs = append(ctxs, metactx.DirtyBitmapPrefix+b)
			}
			for _, ctx := range ctxs {
				for _, form := range [][]string{{"--map=" + ctx}, {"--json", "--map=" + ctx}} {
					var want, got []byte
					traced(func() { want = runOutput(t, "nbdinfo", append(form, uri)...) })
					s64 := traced(func() {
						if got := cmdOutput(t, libnbdCmd(prefix, "nbdinfo", append(form, uri)...)); !bytes.Equal(got, want) {
							t.Errorf("nbdinfo 1.22 %v differs from 1.14:\n got %s\nwant %s", form, got, want)
						}
					})
					if !strings.Contains(s64, traceServerExtAck) {
						t.Errorf("nbdinfo 1.22 without extended headers:\n%s", s64)
					}
					s := traced(func() { got = runOutput(t, bin, append(mapArgs(form), uri)...) })
					if !bytes.Equal(got, want) {
						t.Errorf("nbdgw map %v of qemu-nbd:\n got %s\nwant %s", mapArgs(form), got, want)
					}
					if !strings.Contains(s, traceServerExtAck) || !strings.Contains(s, traceServerExtReq) {
						t.Errorf("nbdgw map %v: qemu-nbd did not see extended headers:\n%s", mapArgs(form), s)
					}
					// With 64-bit lengths one request covers the export.
					if n := strings.Count(s, "type = 7 (block status)"); n != 1 {
						t.Errorf("nbdgw map %v: %d block status requests, want 1:\n%s", mapArgs(form), n, s)
					}
				}
				// 32-bit: structured replies only.
				var es []mapEntry
				s := traced(func() { es = goClientMap(t, uri, ctx, false) })
				if want := nbdMapJSON(t, uri, ctx); !slices.Equal(es, want) {
					t.Errorf("32-bit %s:\n got %v\nwant %v", ctx, es, want)
				}
				discs++ // nbdinfo's
				if strings.Contains(s, "(extended headers)") || strings.Contains(s, traceServerExtReq) ||
					!strings.Contains(s, "Reply opt=8 (structured reply), type=1 (ack)") || !strings.Contains(s, traceServerCompactReq) {
					t.Errorf("32-bit %s: qemu-nbd saw another framing:\n%s", ctx, s)
				}
				if n := strings.Count(s, "type = 7 (block status)"); im.name == "6GiB" && n < 2 {
					t.Errorf("32-bit %s: %d block status requests over 6 GiB", ctx, n)
				}
			}
		})
	}
}

// TestQEMU10ServerTakesNbdgwWrites: nbdserver's client writes through
// qemu-nbd 10, with extended headers (as nbdgw backup and attach write)
// and without; the image equals the one qemu-io wrote the same way.
func TestQEMU10ServerTakesNbdgwWrites(t *testing.T) {
	qemu10Require(t)
	dir := t.TempDir()
	base := nbdPick(t, nbdCorpus(t, dir), "three-layers")
	ref := filepath.Join(dir, "ref.qcow2")
	runOutput(t, "qemu-img", "convert", "-O", "qcow2", base.path, ref)
	// 40 MiB is more than one request may carry (32 MiB): the client splits.
	runOutput(t, "qemu-img", "resize", "-q", ref, "64M")
	runOutput(t, "qemu-io", "-c", "write -P 7 1M 40M", "-c", "write -z -u 2M 64k", "-c", "discard 50M 1M", "-c", "write -P 8 5000k 3k", ref)
	for _, ext := range []bool{true, false} {
		t.Run(fmt.Sprintf("ext=%v", ext), func(t *testing.T) {
			img := filepath.Join(dir, fmt.Sprintf("w%v.qcow2", ext))
			runOutput(t, "qemu-img", "convert", "-O", "qcow2", base.path, img)
			runOutput(t, "qemu-img", "resize", "-q", img, "64M")
			t.Run("write", func(t *testing.T) {
				sock := filepath.Join(dir, fmt.Sprintf("w%v.sock", ext))
				_, trace := nbdStartLogged(t, sock, "qemu-nbd", "--trace", "nbd_*", "-t", "-k", sock, "--discard=unmap", img)
				c, err := nbdclient.Dial(context.Background(), nbdURI(sock), nbdclient.Options{StructuredReplies: true, ExtendedHeaders: ext})
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				if _, err := c.WriteAt(bytes.Repeat([]byte{7}, 40<<20), 1<<20); err != nil {
					t.Fatal(err)
				}
				if err := c.WriteZeroes(2<<20, 64<<10, 0); err != nil {
					t.Fatal(err)
				}
				if err := c.Trim(50<<20, 1<<20, 0); err != nil {
					t.Fatal(err)
				}
				if err := c.WriteFlags(bytes.Repeat([]byte{8}, 3<<10), 5000<<10, nbdproto.CmdFlagFUA); err != nil {
					t.Fatal(err)
				}
				if err := c.Flush(); err != nil {
					t.Fatal(err)
				}
				got := make([]byte, 3<<10)
				if _, err := c.ReadAt(got, 5000<<10); err != nil || !bytes.Equal(got, bytes.Repeat([]byte{8}, 3<<10)) {
					t.Errorf("read back: %v", err)
				}
				s := trace.String()
				// 40 MiB in two requests, then 3 KiB.
				if n := strings.Count(s, "type = 1 (write)"); n != 3 {
					t.Errorf("qemu-nbd decoded %d writes, want 3", n)
				}
				if strings.Contains(s, traceServerExtAck) != ext || strings.Contains(s, traceServerExtReq) != ext {
					t.Errorf("qemu-nbd's trace does not show extended headers %v:\n%.3000s", ext, s)
				}
			})
			if out, err := exec.Command("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", img, ref).CombinedOutput(); err != nil {
				t.Errorf("qemu-img compare with qemu-io's writes: %v\n%s", err, out)
			}
		})
	}
}

// goClientMap is nbdserver's client's map of ctx (merged as nbdinfo
// merges), with or without extended headers.
func goClientMap(t *testing.T, uri, ctx string, ext bool) []mapEntry {
	t.Helper()
	c, err := nbdclient.Dial(context.Background(), uri, nbdclient.Options{StructuredReplies: true, ExtendedHeaders: ext, MetaContexts: []string{ctx}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var es []mapEntry
	err = c.BlockStatus(context.Background(), ctx, 0, c.Size(), func(off, n int64, f uint32) error {
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
	return es
}

// bsScript is a libnbd Python client: it negotiates the contexts named on
// its command line and prints, as JSON, whether extended headers and
// block status payloads were negotiated, one block_status_64 call over
// the whole export, and one block_status_filter call for every non-empty
// subset of the contexts.
const bsScript = `
import json, sys, nbd
uri, ctxs = sys.argv[1], sys.argv[2:]
h = nbd.NBD()
for c in ctxs:
    h.add_meta_context(c)
h.connect_uri(uri)
size = h.get_size()
def call(f, *a):
    got = {}
    def cb(ctx, off, ents, err):
        got.setdefault(ctx, []).append([off, [list(e) for e in ents]])
        return 0
    f(size, 0, *a, cb)
    return got
out = {"extended": h.get_extended_headers_negotiated(), "payload": h.can_block_status_payload(),
       "size": size, "all": call(h.block_status_64), "filters": []}
for mask in range(1, 1 << len(ctxs)):
    sub = [c for i, c in enumerate(ctxs) if mask >> i & 1]
    out["filters"].append({"filter": sub, "got": call(h.block_status_filter, sub)})
h.shutdown()
print(json.dumps(out))
`

type bsResult struct {
	Extended bool
	Payload  bool
	Size     int64
	All      map[string][][2]json.RawMessage
	Filters  []struct {
		Filter []string
		Got    map[string][][2]json.RawMessage
	}
}

// bsExtents decodes the callbacks of one context in one call: one
// callback, starting at offset 0; it returns the extents merged as
// nbdinfo merges them.
func bsExtents(t *testing.T, calls [][2]json.RawMessage) []mapEntry {
	t.Helper()
	if len(calls) != 1 {
		t.Fatalf("%d callbacks for one context in one call", len(calls))
	}
	var off int64
	var ents [][2]int64
	if err := json.Unmarshal(calls[0][0], &off); err != nil || off != 0 {
		t.Fatalf("callback at %s, %v", calls[0][0], err)
	}
	if err := json.Unmarshal(calls[0][1], &ents); err != nil {
		t.Fatal(err)
	}
	var es []mapEntry
	for _, e := range ents {
		if k := len(es) - 1; k >= 0 && es[k].Type == uint32(e[1]) {
			es[k].Length += e[0]
		} else {
			es = append(es, mapEntry{off, e[0], uint32(e[1])})
		}
		off += e[0]
	}
	return es
}

// TestLibnbd118 runs libnbd 1.22's clients against nbdgw serve: nbdinfo
// --json (extended headers), nbdcopy, block_status_64 over 6 GiB in one
// call and block_status_filter over every subset of 2 to 5 negotiated
// contexts, compared with what qemu-nbd 10 answers the same script.
func TestLibnbd118(t *testing.T) {
	qemu10Require(t)
	bin := nbdgwBinary(t)
	prefix := libnbdPrefix(t)
	dir := t.TempDir()
	im := bigImage(t, dir)
	script := filepath.Join(dir, "bs.py")
	if err := os.WriteFile(script, []byte(bsScript), 0o644); err != nil {
		t.Fatal(err)
	}
	ours, theirs := filepath.Join(dir, "o.sock"), filepath.Join(dir, "q.sock")
	nbdStart(t, ours, bin, "serve", "--socket", ours, im.path)
	nbdStart(t, theirs, "qemu-nbd", "-t", "-r", "-k", theirs, "-A", "-B", "b1", "-B", "b2", im.path)
	o, q := nbdURI(ours), nbdURI(theirs)

	t.Run("nbdinfo --json", func(t *testing.T) {
		var info struct {
			Structured bool `json:"structured"`
			Extended   bool `json:"extended"`
			Exports    []struct {
				Size     int64    `json:"export-size"`
				Contexts []string `json:"contexts"`
				Payload  bool     `json:"can_block_status_payload"`
			} `json:"exports"`
		}
		if err := json.Unmarshal(cmdOutput(t, libnbdCmd(prefix, "nbdinfo", "--json", o)), &info); err != nil {
			t.Fatal(err)
		}
		want := []string{metactx.BaseAllocation, metactx.AllocationDepth, metactx.JointAllocation, "qemu:dirty-bitmap:b1", "qemu:dirty-bitmap:b2"}
		if !info.Structured || !info.Extended || len(info.Exports) != 1 || !info.Exports[0].Payload ||
			info.Exports[0].Size != 6<<30 || !slices.Equal(info.Exports[0].Contexts, want) {
			t.Errorf("nbdinfo --json: %+v", info)
		}
	})
	t.Run("nbdcopy", func(t *testing.T) {
		// nbdcopy leaves holes where block status says zero; qemu-img
		// compare then skips them.
		cp := filepath.Join(dir, "cp.raw")
		for _, conns := range []string{"1", "4"} {
			cmdOutput(t, libnbdCmd(prefix, "nbdcopy", "--connections="+conns, o, cp))
			if out, err := exec.Command("qemu-img", "compare", "-f", "raw", cp, im.path).CombinedOutput(); err != nil {
				t.Errorf("nbdcopy 1.22 --connections=%s differs from the image: %v\n%s", conns, err, out)
			}
			os.Remove(cp)
		}
	})

	ctxs := []string{metactx.BaseAllocation, metactx.AllocationDepth, "qemu:dirty-bitmap:b1", metactx.JointAllocation, "qemu:dirty-bitmap:b2"}
	run := func(t *testing.T, uri string, ctxs []string) bsResult {
		var r bsResult
		if err := json.Unmarshal(cmdOutput(t, libnbdCmd(prefix, "python3", append([]string{script, uri}, ctxs...)...)), &r); err != nil {
			t.Fatal(err)
		}
		if !r.Extended || !r.Payload || r.Size != 6<<30 {
			t.Fatalf("%s: extended %v, block status payload %v, size %d", uri, r.Extended, r.Payload, r.Size)
		}
		return r
	}
	for k := 2; k <= len(ctxs); k++ {
		t.Run(fmt.Sprintf("%d contexts", k), func(t *testing.T) {
			r := run(t, o, ctxs[:k])
			// qemu-nbd has no joint-allocation: its answers for the others.
			var qctxs []string
			for _, c := range ctxs[:k] {
				if c != metactx.JointAllocation {
					qctxs = append(qctxs, c)
				}
			}
			rq := run(t, q, qctxs)
			for _, c := range ctxs[:k] {
				es := bsExtents(t, r.All[c])
				var n int64
				for _, e := range es {
					n += e.Length
				}
				if n != r.Size { // one call, more than 4 GiB
					t.Errorf("%s: one block_status_64 call covered %d of %d bytes", c, n, r.Size)
				}
				if c == metactx.JointAllocation {
					want := jointFromQemu(bsExtents(t, rq.All[metactx.BaseAllocation]), nbdMapJSON(t, q, metactx.AllocationDepth))
					if !slices.Equal(es, want) {
						t.Errorf("%s:\n got %v\nwant %v", c, es, want)
					}
				} else if want := bsExtents(t, rq.All[c]); !slices.Equal(es, want) {
					t.Errorf("%s: nbdgw %v, qemu-nbd %v", c, es, want)
				}
			}
			if len(r.Filters) != 1<<k-1 {
				t.Fatalf("%d filter calls", len(r.Filters))
			}
			for _, f := range r.Filters {
				var got []string
				for c := range f.Got {
					got = append(got, c)
				}
				slices.Sort(got)
				want := slices.Sorted(slices.Values(f.Filter))
				if !slices.Equal(got, want) {
					t.Errorf("filter %v answered for %v", f.Filter, got)
					continue
				}
				for _, c := range f.Filter {
					if g, w := bsExtents(t, f.Got[c]), bsExtents(t, r.All[c]); !slices.Equal(g, w) {
						t.Errorf("filter %v, %s: %v, unfiltered %v", f.Filter, c, g, w)
					}
				}
			}
			for _, f := range rq.Filters {
				if len(f.Got) != len(f.Filter) {
					t.Errorf("qemu-nbd: filter %v answered %d contexts", f.Filter, len(f.Got))
					continue
				}
				for _, c := range f.Filter {
					if g, w := bsExtents(t, f.Got[c]), bsExtents(t, r.All[c]); !slices.Equal(g, w) {
						t.Errorf("qemu-nbd: filter %v, %s: %v, nbdgw unfiltered %v", f.Filter, c, g, w)
					}
				}
			}
		})
	}
}

// rawConn is an NBD client that sends what libnbd refuses to send:
// block status payloads naming no or unknown contexts, payloads on
// commands that take none.
type rawConn struct {
	c      net.Conn
	r      *bufio.Reader
	cookie uint64
}

var be = binary.BigEndian

func rawDial(t *testing.T, uri string, ctxs []string) *rawConn {
	t.Helper()
	u, err := nbdproto.ParseURI(uri)
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial(u.Network, u.Address)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(20 * time.Second))
	rc := &rawConn{c: c, r: bufio.NewReader(c)}
	var hello [18]byte
	if _, err := io.ReadFull(rc.r, hello[:]); err != nil {
		t.Fatal(err)
	}
	c.Write(be.AppendUint32(nil, nbdproto.ClientFixedNewstyle|nbdproto.ClientNoZeroes))
	opt := func(o nbdproto.Option, data []byte) (replies [][]byte) {
		b := nbdproto.OptHeader{Opt: o, Length: uint32(len(data))}.Append(nil)
		if _, err := c.Write(append(b, data...)); err != nil {
			t.Fatal(err)
		}
		for {
			var hb [nbdproto.OptReplyHeaderLen]byte
			if _, err := io.ReadFull(rc.r, hb[:]); err != nil {
				t.Fatal(err)
			}
			h, err := nbdproto.DecodeOptReply(hb[:])
			if err != nil {
				t.Fatal(err)
			}
			d := make([]byte, h.Length)
			if _, err := io.ReadFull(rc.r, d); err != nil {
				t.Fatal(err)
			}
			switch {
			case h.Type == nbdproto.RepAck:
				return replies
			case h.Type.IsError():
				t.Fatalf("option %v: error reply %v %s", o, h.Type, d)
			default:
				replies = append(replies, d)
			}
		}
	}
	opt(nbdproto.OptExtendedHeaders, nil)
	q := nbdproto.MetaContextRequest{Queries: ctxs}.Append(nil) // export ""
	ids := map[string]uint32{}
	for _, d := range opt(nbdproto.OptSetMetaContext, q) {
		ids[string(d[4:])] = be.Uint32(d)
	}
	if len(ids) != len(ctxs) {
		t.Fatalf("negotiated %v, asked %v", ids, ctxs)
	}
	opt(nbdproto.OptGo, nbdproto.InfoRequest{}.Append(nil))
	return rc
}

// rawReply is what a request got: the error chunk's errno and message,
// or the types of its chunks; dropped when the server closed the
// connection instead.
type rawReply struct {
	Errno   nbdproto.Errno
	Msg     string
	Chunks  []nbdproto.ReplyType
	Dropped bool
}

func (rc *rawConn) do(t *testing.T, typ nbdproto.Command, flags nbdproto.CmdFlags, off, length uint64, payload []byte) rawReply {
	t.Helper()
	rc.cookie++
	b := nbdproto.Request{Flags: flags, Type: typ, Cookie: rc.cookie, Offset: off, Length: length}.Append(nil, true)
	if _, err := rc.c.Write(append(b, payload...)); err != nil {
		return rawReply{Dropped: true}
	}
	var r rawReply
	for {
		var hb [nbdproto.ExtendedReplyLen]byte
		if _, err := io.ReadFull(rc.r, hb[:]); err != nil {
			r.Dropped = true
			return r
		}
		h, err := nbdproto.DecodeReplyHeader(hb[:])
		if err != nil || h.Magic != nbdproto.ExtendedReplyMagic || h.Cookie != rc.cookie {
			t.Fatalf("bad reply header %x", hb)
		}
		d := make([]byte, h.Length)
		if _, err := io.ReadFull(rc.r, d); err != nil {
			r.Dropped = true
			return r
		}
		r.Chunks = append(r.Chunks, h.Type)
		if h.Type.IsError() && len(d) >= 6 {
			r.Errno = nbdproto.Errno(be.Uint32(d))
			r.Msg = string(d[6 : 6+int(be.Uint16(d[4:]))])
		}
		if h.Flags&nbdproto.ReplyFlagDone != 0 {
			return r
		}
	}
}

// TestBlockStatusPayloadMisuse sends the misuses of block status payloads
// that libnbd will not send to nbdgw serve and to qemu-nbd 10, and
// compares the replies: the errno must be QEMU's and the connection must
// survive as it does with QEMU; nbdgw's messages are checked exactly.
func TestBlockStatusPayloadMisuse(t *testing.T) {
	qemu10Require(t)
	bin := nbdgwBinary(t)
	dir := t.TempDir()
	im := nbdPick(t, nbdCorpus(t, dir), "three-layers")
	ours, theirs := filepath.Join(dir, "o.sock"), filepath.Join(dir, "q.sock")
	nbdStart(t, ours, bin, "serve", "--socket", ours, im.path)
	nbdStart(t, theirs, "qemu-nbd", "-t", "-r", "-k", theirs, "-A", "-B", "bm1", "-B", "bm2", im.path)
	ctxs := []string{metactx.BaseAllocation, metactx.AllocationDepth, "qemu:dirty-bitmap:bm1"}
	bsPayload := func(length uint64, ids ...uint32) []byte {
		return nbdproto.BlockStatusPayload{Length: length, IDs: ids}.Append(nil)
	}
	const size = 6 << 20
	cases := []struct {
		name    string
		typ     nbdproto.Command
		flags   nbdproto.CmdFlags
		payload []byte
		wantMsg string // nbdgw's message (the errno is EINVAL, as qemu-nbd's)
	}{
		{"empty filter", nbdproto.CmdBlockStatus, nbdproto.CmdFlagPayloadLen, bsPayload(size), "block status payload names no context"},
		{"unknown id", nbdproto.CmdBlockStatus, nbdproto.CmdFlagPayloadLen, bsPayload(size, 99), "metadata context id 99 was not negotiated"},
		{"id twice", nbdproto.CmdBlockStatus, nbdproto.CmdFlagPayloadLen, bsPayload(size, 0, 0), "metadata context id 0 named twice"},
		{"more ids than contexts", nbdproto.CmdBlockStatus, nbdproto.CmdFlagPayloadLen, bsPayload(size, 0, 1, 2, 0), "unexpected payload of 24 bytes for NBD_CMD_BLOCK_STATUS"},
		{"payload not ids", nbdproto.CmdBlockStatus, nbdproto.CmdFlagPayloadLen, append(bsPayload(size, 0), 1, 2), "nbd: malformed block status payload: length 14"},
		{"payload on read", nbdproto.CmdRead, nbdproto.CmdFlagPayloadLen, make([]byte, 16), "unexpected payload of 16 bytes for NBD_CMD_READ"},
		{"payload on flush", nbdproto.CmdFlush, nbdproto.CmdFlagPayloadLen, make([]byte, 16), "unexpected payload of 16 bytes for NBD_CMD_FLUSH"},
		{"payload on cache", nbdproto.CmdCache, nbdproto.CmdFlagPayloadLen, make([]byte, 16), "unexpected payload of 16 bytes for NBD_CMD_CACHE"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var got [2]rawReply
			for i, sock := range []string{ours, theirs} {
				rc := rawDial(t, nbdURI(sock), ctxs)
				got[i] = rc.do(t, tc.typ, tc.flags, 0, uint64(len(tc.payload)), tc.payload)
				if !got[i].Dropped {
					// The connection still works.
					if r := rc.do(t, nbdproto.CmdBlockStatus, 0, 0, size, nil); r.Dropped || r.Errno != 0 || len(r.Chunks) != len(ctxs) {
						t.Errorf("%s: after the misuse: %+v", sock, r)
					}
				}
			}
			t.Logf("nbdgw %+v, qemu-nbd %+v", got[0], got[1])
			if got[0].Errno != got[1].Errno || got[0].Dropped != got[1].Dropped {
				t.Errorf("nbdgw answers %+v, qemu-nbd 10 %+v", got[0], got[1])
			}
			if got[0].Msg != tc.wantMsg || got[0].Errno != nbdproto.EINVAL || len(got[0].Chunks) != 1 {
				t.Errorf("nbdgw's message %q, want %q", got[0].Msg, tc.wantMsg)
			}
		})
	}
}
