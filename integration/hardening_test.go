package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nbdgw/nbdgw/internal/corpus"
	"github.com/nbdgw/nbdgw/internal/hostile"
	"github.com/nbdgw/nbdgw/internal/metactx"
	"github.com/nbdgw/nbdgw/nbdserver"
	"github.com/nbdgw/nbdgw/nbdserver/nbdclient"
	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
	"github.com/nbdgw/nbdgw/nbdserver/testcerts"
	"github.com/nbdgw/nbdgw/qcow2"
)

// TestHardeningCorpus drives every crafted image of package corpus
// through every front end as a user would: nbdgw map (qemu-img form and
// each --context), nbdgw info, nbdgw serve with nbdinfo --map, nbdcopy
// and the Go client, and nbdgw mount with cat. Each must fail with an
// error naming the broken structure (exit status 1 for the CLI), or, for
// images QEMU reads without complaint, agree with qemu-img byte for byte;
// never panic, never hang, never exceed hardMaxRSS.
func TestHardeningCorpus(t *testing.T) {
	t.Parallel()
	hardRequire(t, "qemu-img", "qemu-io", "nbdinfo", "nbdcopy")
	bin := nbdgwBinary(t)
	cases, err := corpus.Generate(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if len(cases) < 30 {
		t.Fatalf("corpus has %d cases, want at least 30", len(cases))
	}
	fuse := hardFUSE()
	for _, c := range cases {
		t.Run(c.Name, func(t *testing.T) {
			t.Parallel()
			var want []byte // what QEMU reads, for images it accepts
			if c.Stage == corpus.Accept {
				want = hardQemuRaw(t, c.Image)
			}
			hardCorpusCLI(t, bin, c)
			hardCorpusServe(t, bin, c, want)
			t.Run("mount", func(t *testing.T) {
				if fuse != "" {
					t.Skipf("FUSE part: %s", fuse) // scripts/test.sh fails on it
				}
				hardCorpusMount(t, bin, c, want)
			})
		})
	}
}

func hardContexts(c corpus.Case) []string {
	ctx := []string{metactx.BaseAllocation, metactx.AllocationDepth, "qemu:joint-allocation"}
	if c.Bitmap != "" {
		ctx = append(ctx, metactx.DirtyBitmapPrefix+c.Bitmap)
	}
	return ctx
}

// hardCorpusCLI runs map and info.
func hardCorpusCLI(t *testing.T, bin string, c corpus.Case) {
	type cmd struct {
		args    []string
		bitmap  bool // reads the bitmap table
		mapping bool // walks L1/L2
	}
	cmds := []cmd{
		{args: []string{"info", c.Image}},
		{args: []string{"info", "--output=json", c.Image}},
		{args: []string{"map", "--output=json", c.Image}, mapping: true},
		{args: []string{"map", c.Image}, mapping: true},
	}
	for _, name := range hardContexts(c) {
		cmds = append(cmds, cmd{args: []string{"map", "--context", name, c.Image}, mapping: true,
			bitmap: strings.HasPrefix(name, metactx.DirtyBitmapPrefix)})
	}
	// All at once: a case that hangs costs one timeout, not one each.
	results := make([]hardResult, len(cmds))
	var wg sync.WaitGroup
	for i, x := range cmds {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = hardExec(15*time.Second, bin, x.args...)
		}()
	}
	wg.Wait()
	for i, x := range cmds {
		r := results[i]
		hardSane(t, r)
		if x.args[0] == "map" && x.args[1] == c.Image && r.code == 1 && bytes.Contains(r.stderr, []byte("compressed clusters")) {
			continue // qemu-img map's human form refuses compressed clusters too
		}
		switch {
		case c.Name == "backing-missing" && x.args[0] == "info":
			// As qemu-img info, nbdgw info shows the image, and warns
			// that its backing file is missing (TestInfoMissingBacking).
			if r.code != 0 {
				t.Errorf("want success: %s", r)
			}
			hardMentions(t, strings.Join(x.args[:len(x.args)-1], " "), r.stderr, c.Want)
		case c.Stage == corpus.Open,
			c.Stage == corpus.Bitmap && x.bitmap:
			if r.code != 1 {
				t.Errorf("want exit status 1 with an error: %s", r)
			}
			hardMentions(t, strings.Join(x.args[:len(x.args)-1], " "), r.stderr, c.Want)
		case c.Stage == corpus.Read && x.mapping:
			// Some breakage (compressed data) only shows on read.
			if r.code != 0 {
				if r.code != 1 {
					t.Errorf("want exit status 0 or 1: %s", r)
				}
				hardMentions(t, strings.Join(x.args[:len(x.args)-1], " "), r.stderr, c.Want)
			}
		default:
			if r.code != 0 {
				t.Errorf("want success: %s", r)
			}
		}
	}
	if c.Stage == corpus.Accept {
		q := hardExec(30*time.Second, "qemu-img", "map", "--output=json", c.Image)
		r := hardExec(30*time.Second, bin, "map", "--output=json", c.Image)
		if q.code == 0 && !bytes.Equal(q.stdout, r.stdout) {
			t.Errorf("nbdgw map --output=json differs from qemu-img map:\n%s\nqemu-img:\n%s", r.stdout, q.stdout)
		}
	}
}

// hardCorpusServe serves the image and reads it with libnbd's tools and
// the Go client.
func hardCorpusServe(t *testing.T, bin string, c corpus.Case, want []byte) {
	s, r := hardServe(t, bin, c.Image)
	if s == nil {
		hardSane(t, r)
		if c.Stage != corpus.Open {
			t.Fatalf("nbdgw serve did not start: %s", r)
		}
		if r.code != 1 {
			t.Errorf("nbdgw serve: want exit status 1: %s", r)
		}
		hardMentions(t, "serve", r.stderr, c.Want)
		return
	}
	if c.Stage == corpus.Open {
		t.Errorf("nbdgw serve started on an image that does not open")
	}
	for _, name := range hardContexts(c) {
		m := hardExec(30*time.Second, "nbdinfo", "--map="+name, s.uri)
		hardSane(t, m)
		bad := c.Stage == corpus.Bitmap && strings.HasPrefix(name, metactx.DirtyBitmapPrefix)
		switch {
		case bad && m.code == 0:
			t.Errorf("nbdinfo --map=%s succeeded on a broken bitmap: %s", name, m.stdout)
		case !bad && c.Stage != corpus.Read && m.code != 0:
			t.Errorf("nbdinfo --map=%s: %s", name, m)
		}
	}
	cp := hardExec(60*time.Second, "nbdcopy", s.uri, "-")
	hardSane(t, cp)
	switch {
	case c.Stage == corpus.Read && cp.code == 0:
		t.Errorf("nbdcopy read a broken image without error")
	case c.Stage != corpus.Read && cp.code != 0:
		t.Errorf("nbdcopy: %s", cp)
	case want != nil && !bytes.Equal(cp.stdout, want):
		t.Errorf("nbdcopy read %d bytes that differ from qemu-img convert's %d", len(cp.stdout), len(want))
	}

	// The Go client sees the server's message naming the problem.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cl, err := nbdclient.Dial(ctx, s.uri, nbdclient.Options{StructuredReplies: true, MetaContexts: hardContexts(c)})
	if err != nil {
		t.Fatalf("Go client: %v", err)
	}
	defer cl.Close()
	buf := make([]byte, cl.Size())
	_, err = cl.ReadAt(buf, 0)
	var se *nbdproto.ServerError
	switch {
	case c.Stage == corpus.Read:
		if !errors.As(err, &se) {
			t.Errorf("Go client read: %v, want a server error", err)
		} else {
			hardMentions(t, "NBD error reply", []byte(se.Msg), c.Want)
		}
	case err != nil:
		t.Errorf("Go client read: %v", err)
	case want != nil && !bytes.Equal(buf, want):
		t.Errorf("Go client read differs from qemu-img convert")
	}
	if c.Stage == corpus.Bitmap {
		err := cl.BlockStatus(ctx, metactx.DirtyBitmapPrefix+c.Bitmap, 0, cl.Size(), func(int64, int64, uint32) error { return nil })
		if !errors.As(err, &se) {
			t.Errorf("Go client bitmap status: %v, want a server error", err)
		} else {
			hardMentions(t, "NBD bitmap error reply", []byte(se.Msg), c.Want)
		}
	}
	// The server survives and still serves.
	if r := hardExec(30*time.Second, "nbdinfo", "--size", s.uri); r.code != 0 {
		t.Errorf("server gone after the errors: %s", r)
	}
	cl.Close()
	r = s.stop(t)
	hardSane(t, r)
	if r.code != 0 {
		t.Errorf("nbdgw serve after SIGTERM: %s", r)
	}
}

// hardCorpusMount mounts the image and reads the disk and the maps.
func hardCorpusMount(t *testing.T, bin string, c corpus.Case, want []byte) {
	m, r := hardMount(t, bin, c.Image)
	if m == nil {
		hardSane(t, r)
		if c.Stage != corpus.Open {
			t.Fatalf("nbdgw mount did not mount: %s", r)
		}
		if r.code != 1 {
			t.Errorf("nbdgw mount: want exit status 1: %s", r)
		}
		hardMentions(t, "mount", r.stderr, c.Want)
		return
	}
	if c.Stage == corpus.Open {
		t.Errorf("nbdgw mount mounted an image that does not open")
	}
	disk, err := hardReadFile(filepath.Join(m.dir, "disk"), 30*time.Second)
	switch {
	case c.Stage == corpus.Read:
		if err == nil {
			t.Errorf("FUSE BUG: cat disk read %d bytes of a broken image without error (virtual size %d): a silent wrong answer", len(disk), hardVirtualSize(t, c))
		} else if !strings.Contains(err.Error(), "input/output error") {
			t.Errorf("cat disk: %v, want EIO", err)
		}
	case err != nil:
		t.Errorf("cat disk: %v", err)
	case want != nil && !bytes.Equal(disk, want):
		t.Errorf("cat disk differs from qemu-img convert")
	}
	for _, name := range hardContexts(c) {
		file := filepath.Join(m.dir, "maps", strings.NewReplacer("qemu:", "", "base:", "base-", ":", "-").Replace(name))
		_, err := hardReadFile(file, 30*time.Second)
		bad := c.Stage == corpus.Bitmap && strings.HasPrefix(name, metactx.DirtyBitmapPrefix)
		switch {
		case bad && err == nil:
			t.Errorf("%s read without error on a broken bitmap", file)
		case !bad && c.Stage != corpus.Read && err != nil:
			t.Errorf("%s: %v", file, err)
		case err != nil && strings.HasPrefix(err.Error(), "HANG"):
			t.Error(err)
		}
	}
	r = m.stop(t)
	hardSane(t, r)
	if r.code != 0 {
		t.Errorf("nbdgw mount after SIGTERM: %s", r)
	}
	if c.Stage == corpus.Read || c.Stage == corpus.Bitmap {
		// The log names the problem for the operator.
		hardMentions(t, "mount log", r.stderr, c.Want)
	}
}

// TestHardeningMemoryBombs: images whose metadata is legal-looking but as
// large as the format allows, in sparse files that cost nothing on disk:
// the engine must stay within hardMaxRSS or refuse.
func TestHardeningMemoryBombs(t *testing.T) {
	t.Parallel()
	hardRequire(t, "qemu-img")
	bin := nbdgwBinary(t)
	t.Run("chain-of-64-with-32MiB-L1-tables", func(t *testing.T) {
		dir := t.TempDir()
		// A chain of 64 layers (the limit), each with an L1 table of
		// 32 MiB (QEMU's limit) in a sparse file: 2 GiB of L1 tables if
		// all are loaded.
		const layers = 64
		for i := layers; i >= 1; i-- {
			name := filepath.Join(dir, hardLayerName(i))
			args := []string{"create", "-q", "-f", "qcow2"}
			if i < layers {
				args = append(args, "-u", "-b", hardLayerName(i+1), "-F", "qcow2")
			}
			if r := hardExec(30*time.Second, "qemu-img", append(args, name, "1M")...); r.code != 0 {
				t.Fatal(r)
			}
			hardBloatL1(t, name)
		}
		top := filepath.Join(dir, hardLayerName(1))
		for _, args := range [][]string{{"info", top}, {"map", "--output=json", top}} {
			r := hardExec(120*time.Second, bin, args...)
			t.Logf("%s: exit %d, peak RSS %d MiB, %v", strings.Join(args, " "), r.code, r.rss>>20, r.elapsed.Round(time.Millisecond))
			if r.rss > hardMaxRSS {
				t.Errorf("ENGINE BUG (qcow2): every layer's L1 table is loaded whole, so a chain of sparse files costs layers x 32 MiB (x2 while decoding)")
			}
			hardSane(t, r)
		}
	})
	t.Run("bitmap-table-of-1GiB", func(t *testing.T) {
		// A 1 EiB image with 2 MiB clusters and a bitmap of granularity
		// 512: its table has 2^27 entries (1 GiB, QEMU's
		// BME_MAX_TABLE_SIZE) in a sparse region. QEMU refuses it at
		// open ("doesn't satisfy the constraints": the bitmap's data
		// would exceed BME_MAX_PHYS_SIZE, 512 MiB).
		img := filepath.Join(t.TempDir(), "bm.qcow2")
		for _, s := range [][]string{
			{"qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", img, "4M"},
			{"qemu-img", "bitmap", "--add", "-g", "512", img, "b0"},
		} {
			if r := hardExec(30*time.Second, s[0], s[1:]...); r.code != 0 {
				t.Fatal(r)
			}
		}
		hardBloatBitmap(t, img)
		if r := hardExec(30*time.Second, "qemu-img", "info", img); r.code == 0 {
			t.Logf("NOTE: qemu-img info accepts the image")
		}
		for _, args := range [][]string{{"info", img}, {"map", "--context", "qemu:dirty-bitmap:b0", img}} {
			r := hardExec(120*time.Second, bin, args...)
			t.Logf("%s: exit %d, peak RSS %d MiB, %v", strings.Join(args, " "), r.code, r.rss>>20, r.elapsed.Round(time.Millisecond))
			if r.rss > hardMaxRSS {
				t.Errorf("ENGINE BUG (qcow2): a bitmap table is loaded whole ([]byte and []uint64: 2 GiB for 2^27 entries); QEMU refuses such a bitmap at open (BME_MAX_PHYS_SIZE)")
			}
			hardSane(t, r)
		}
	})
}

// hardBloatBitmap turns a 4 MiB image with 2 MiB clusters and one bitmap
// of granularity 512 into a 1 EiB image: a new zeroed L1 table and a new
// zeroed bitmap table of 2^27 entries, both in a sparse tail.
func hardBloatBitmap(t *testing.T, name string) {
	t.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	const cs = 2 << 20
	h, err := qcow2.ParseHeader(name, b[:min(len(b), cs)], int64(len(b)))
	if err != nil || !h.HasBitmapExt {
		t.Fatalf("header: %v, bitmaps %v", err, h != nil && h.HasBitmapExt)
	}
	const size = 1 << 60
	const l1Entries = size / (cs / 8 * cs)
	const tableEntries = 1 << 27
	l1 := (uint64(len(b)) + cs - 1) &^ (cs - 1)
	table := (l1 + l1Entries*8 + cs - 1) &^ (cs - 1)
	f, err := os.OpenFile(name, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(int64(table + tableEntries*8)); err != nil {
		t.Fatal(err)
	}
	put := func(off uint64, v []byte) {
		if _, err := f.WriteAt(v, int64(off)); err != nil {
			t.Fatal(err)
		}
	}
	put(24, hardBE.AppendUint64(nil, size))
	put(36, hardBE.AppendUint32(nil, l1Entries))
	put(40, hardBE.AppendUint64(nil, l1))
	put(h.BitmapDirOffset, hardBE.AppendUint64(nil, table))
	put(h.BitmapDirOffset+8, hardBE.AppendUint32(nil, tableEntries))
}

func hardLayerName(i int) string { return fmt.Sprintf("l%02d.qcow2", i) }

// hardBloatL1 moves the L1 table of a fresh 1 MiB image to the end of a
// sparse extension of the file and makes it 4 Mi entries (32 MiB) long,
// all zero: a valid image that claims a huge L1 table.
func hardBloatL1(t *testing.T, name string) {
	t.Helper()
	f, err := os.OpenFile(name, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	const entries = 4 << 20
	l1 := (fi.Size() + 65535) &^ 65535
	if err := f.Truncate(l1 + entries*8); err != nil {
		t.Fatal(err)
	}
	var b [16]byte
	hardBE.PutUint32(b[0:], entries)
	hardBE.PutUint64(b[4:], uint64(l1))
	if _, err := f.WriteAt(b[:12], 36); err != nil {
		t.Fatal(err)
	}
}

// hardVirtualSize is what qemu-img info says the image's size is, or -1.
func hardVirtualSize(t *testing.T, c corpus.Case) int64 {
	r := hardExec(30*time.Second, "qemu-img", "info", "--output=json", c.Image)
	var v struct {
		Size int64 `json:"virtual-size"`
	}
	if r.code != 0 || json.Unmarshal(r.stdout, &v) != nil {
		return -1
	}
	return v.Size
}

// hardAllContexts is every context a chain built by hardChain offers.
var hardAllContexts = []string{metactx.BaseAllocation, metactx.AllocationDepth, "qemu:joint-allocation", metactx.DirtyBitmapPrefix + "b0"}

// TestHardeningHostileClients runs misbehaving clients against a real
// `nbdgw serve` while well-behaved clients (simple, structured and
// extended framings) keep reading and mapping; every good answer is
// checked against qemu-img convert and qemu-nbd. It complements
// nbdserver's in-process TestHostileClients with the real binary,
// concurrency, slow readers, and the limits.
func TestHardeningHostileClients(t *testing.T) {
	t.Parallel()
	hardRequire(t, "qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")
	bin := nbdgwBinary(t)
	top, _ := hardChain(t, t.TempDir())
	o := hardQemuOracle(t, top, "b0")
	s, r := hardServe(t, bin, top)
	if s == nil {
		t.Fatal(r)
	}
	pid := s.cmd.Process.Pid
	idleRSS, _ := hardProcRSS(pid)

	t.Run("conformance", func(t *testing.T) { hardConformance(t, s.socket, o) })

	// Good clients, for the whole test.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var goodMu sync.Mutex // guards goodN
	goodN := map[string]int{}
	good := map[string]nbdclient.Options{
		"simple":     {},
		"structured": {StructuredReplies: true, MetaContexts: hardAllContexts},
		"extended":   {ExtendedHeaders: true, MetaContexts: hardAllContexts},
		"extended-2": {ExtendedHeaders: true, MetaContexts: hardAllContexts[1:]},
	}
	i := uint64(0)
	for name, opts := range good {
		i++
		wg.Add(1)
		go func(seed uint64) {
			defer wg.Done()
			n, err := hardGoodClient(s.uri, opts, o, seed, stop, 1<<30)
			if err != nil {
				t.Errorf("good %s client after %d requests: %v", name, n, err)
			}
			goodMu.Lock()
			goodN[name] = n
			goodMu.Unlock()
		}(i)
	}

	// Slow readers: each sends 64 reads of 32 MiB and never reads a
	// reply. The server may hold at most MaxInFlight (16) of them per
	// connection.
	const slow = 2
	var slowConns []net.Conn
	for k := 0; k < slow; k++ {
		c, err := hostile.Stall("unix", s.socket, 64, 32<<20)
		if err != nil {
			t.Fatal(err)
		}
		slowConns = append(slowConns, c)
	}
	slowRSS := hardPeakRSS(pid, time.Second, 20*time.Second)
	per := (slowRSS - idleRSS) / slow
	t.Logf("server RSS idle %d MiB; with %d slow readers each asking 64 reads of 32 MiB: %d MiB (%d MiB per slow reader)",
		idleRSS>>20, slow, slowRSS>>20, per>>20)
	// Per-client memory: 16 requests in flight of at most 32 MiB each.
	if per > (nbdserver.DefaultMaxInFlight+4)*nbdserver.DefaultMaxRequest { // + Go runtime slack
		t.Errorf("each slow reader costs the server %d MiB: more than MaxInFlight x MaxRequest", per>>20)
	}

	// Hostile waves.
	sessions := hostile.Sessions(int64(len(o.data)), hardAllContexts)
	var hw sync.WaitGroup
	var tried atomic.Int64
	for w := 0; w < 8; w++ {
		hw.Add(1)
		go func(w int) {
			defer hw.Done()
			for round := 0; round < 5; round++ {
				for _, h := range sessions {
					if err := hostile.Play("unix", s.socket, h, 300*time.Millisecond); err != nil {
						t.Error(err)
					}
					tried.Add(1)
				}
			}
		}(w)
	}
	hw.Wait()
	_, hwm := hardProcRSS(pid)
	t.Logf("%d hostile sessions (%d kinds, 8 at a time); server peak RSS %d MiB", tried.Load(), len(sessions), hwm>>20)
	close(stop)
	wg.Wait()
	for _, c := range slowConns {
		c.Close()
	}
	t.Logf("good clients' requests while under attack: %v", goodN)
	for name, n := range goodN {
		if n == 0 {
			t.Errorf("good %s client completed no request", name)
		}
	}
	// Still serving after all that.
	if n, err := hardGoodClient(s.uri, good["extended"], o, 1234, nil, 100); err != nil || n != 100 {
		t.Errorf("after the attack: %d requests, %v", n, err)
	}
	r = s.stop(t)
	// Memory is checked by TestHardeningServerMemoryBudget.
	hardSaneLimit(t, r, 1<<40)
	if r.code != 0 {
		t.Errorf("serve after SIGTERM: %s", r)
	}
}

// hardConformance checks the server's exact answer to each kind of bad
// request on one connection, which must stay usable after each.
func hardConformance(t *testing.T, socket string, o *hardOracle) {
	for _, mode := range []nbdproto.Option{0, nbdproto.OptStructuredReply} {
		var ctxs []string
		if mode != 0 {
			ctxs = hardAllContexts
		}
		rc, err := hardHandshake("unix", socket, mode, ctxs...)
		if err != nil {
			t.Fatal(err)
		}
		defer rc.Close()
		rc.SetDeadline(time.Now().Add(30 * time.Second))
		// errno of the reply to one request; data of a good read.
		do := func(b []byte, readLen int) (nbdproto.Errno, []byte) {
			t.Helper()
			if _, err := rc.Write(b); err != nil {
				t.Fatal(err)
			}
			if mode == 0 {
				errno, _, p, err := rc.simpleReply(readLen)
				if err != nil {
					t.Fatal(err)
				}
				return errno, p
			}
			var data []byte
			for {
				ch, err := rc.chunk()
				if err != nil {
					t.Fatal(err)
				}
				switch ch.typ {
				case nbdproto.ReplyTypeError, hardReplySimple:
					return nbdproto.Errno(hardBE.Uint32(ch.payload)), nil
				case nbdproto.ReplyTypeOffsetData:
					data = append(data, ch.payload[8:]...)
				case nbdproto.ReplyTypeOffsetHole:
					data = append(data, make([]byte, hardBE.Uint32(ch.payload[8:]))...)
				}
				if ch.flags&nbdproto.ReplyFlagDone != 0 {
					return 0, data
				}
			}
		}
		checkRead := func(off, n int64) {
			t.Helper()
			errno, p := do(hardReq(false, 0, nbdproto.CmdRead, 1, uint64(off), uint64(n)), int(n))
			if errno != 0 || !bytes.Equal(p, o.data[off:off+n]) {
				t.Errorf("mode %d: read %d at %d: errno %d, data correct %v", mode, n, off, errno, bytes.Equal(p, o.data[off:off+n]))
			}
		}
		cases := []struct {
			name  string
			req   []byte
			errno nbdproto.Errno
		}{
			{"read 64 MiB (over the 32 MiB limit)", hardReq(false, 0, nbdproto.CmdRead, 2, 0, 64<<20), nbdproto.EINVAL},
			{"read past the end", hardReq(false, 0, nbdproto.CmdRead, 3, 64<<20-100, 4096), nbdproto.EINVAL},
			{"read at 2^63", hardReq(false, 0, nbdproto.CmdRead, 4, 1<<63, 1), nbdproto.EINVAL},
			{"unknown command", hardReq(false, 0, 99, 5, 0, 512), nbdproto.EINVAL},
			{"unknown flag on read", hardReq(false, 0x4000, nbdproto.CmdRead, 6, 0, 512), nbdproto.EINVAL},
			{"trim", hardReq(false, 0, nbdproto.CmdTrim, 7, 0, 1<<20), nbdproto.EPERM},
			{"write zeroes", hardReq(false, 0, nbdproto.CmdWriteZeroes, 8, 0, 1<<20), nbdproto.EPERM},
			{"write", append(hardReq(false, 0, nbdproto.CmdWrite, 9, 0, 4096), make([]byte, 4096)...), nbdproto.EPERM},
			{"cache past the end", hardReq(false, 0, nbdproto.CmdCache, 10, 1<<40, 1), nbdproto.EINVAL},
		}
		for _, c := range cases {
			if errno, _ := do(c.req, 0); errno != c.errno {
				t.Errorf("mode %d: %s: errno %d, want %d", mode, c.name, errno, c.errno)
			}
			checkRead(12345, 4321) // the connection still works
		}
		checkRead(1, 3)           // misaligned
		checkRead(64<<20-1, 1)    // the last byte
		checkRead(8<<20-100, 200) // across compressed data
		checkRead(0, 32<<20)      // the largest read allowed
		if errno, _ := do(hardReq(false, 0, nbdproto.CmdFlush, 11, 0, 0), 0); errno != 0 {
			t.Errorf("mode %d: flush: errno %d", mode, errno)
		}
	}
}

// TestHardeningConnectionLimit opens more connections than
// --max-connections: the extra ones are not closed but wait in the listen
// backlog (no greeting), and a slot freed lets the next one in.
func TestHardeningConnectionLimit(t *testing.T) {
	t.Parallel()
	hardRequire(t, "qemu-img")
	bin := nbdgwBinary(t)
	img := filepath.Join(t.TempDir(), "a.qcow2")
	if r := hardExec(30*time.Second, "qemu-img", "create", "-q", "-f", "qcow2", img, "1M"); r.code != 0 {
		t.Fatal(r)
	}
	const limit = 8
	s, r := hardServe(t, bin, "--max-connections", fmt.Sprint(limit), img)
	if s == nil {
		t.Fatal(r)
	}
	time.Sleep(100 * time.Millisecond) // the readiness probe's slot is released
	var conns []*hardRawConn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for i := 0; i < limit; i++ {
		c, err := hardDialRaw("unix", s.socket)
		if err != nil {
			t.Fatalf("connection %d of %d: %v", i+1, limit, err)
		}
		conns = append(conns, c)
	}
	// Over the limit: connected (the backlog), no greeting, not closed.
	extra, err := net.Dial("unix", s.socket)
	if err != nil {
		t.Fatal(err)
	}
	defer extra.Close()
	extra.SetReadDeadline(time.Now().Add(time.Second))
	var hello [18]byte
	if n, err := io.ReadFull(extra, hello[:]); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("connection over the limit of %d: read %d bytes, %v; want it to wait in the backlog", limit, n, err)
	}
	conns[0].Close()
	conns = conns[1:]
	extra.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(extra, hello[:]); err != nil {
		t.Errorf("after closing one connection, the waiting one got no greeting: %v", err)
	}
	for _, c := range conns {
		c.Close()
	}
	conns = nil
	r = s.stop(t)
	hardSane(t, r)
}

// TestHardeningTLS checks `nbdgw serve --tls-creds DIR --tls-required`
// with libnbd's tools and raw clients: plaintext is refused, a client
// certificate from another CA is refused, a trusted client reads correct
// data, and a client that never finishes the TLS handshake is dropped.
func TestHardeningTLS(t *testing.T) {
	t.Parallel()
	hardRequire(t, "qemu-img", "qemu-io", "nbdinfo", "nbdcopy")
	bin := nbdgwBinary(t)
	work := t.TempDir()
	creds, foreign, mixed, caOnly := filepath.Join(work, "creds"), filepath.Join(work, "foreign"), filepath.Join(work, "mixed"), filepath.Join(work, "ca-only")
	for _, d := range []string{creds, foreign, mixed, caOnly} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := testcerts.Write(creds, true); err != nil {
		t.Fatal(err)
	}
	if err := testcerts.Write(foreign, true); err != nil {
		t.Fatal(err)
	}
	// mixed trusts our server but presents a client certificate of
	// another CA; ca-only presents none.
	for _, cp := range [][2]string{
		{filepath.Join(creds, "ca-cert.pem"), filepath.Join(mixed, "ca-cert.pem")},
		{filepath.Join(foreign, "client-cert.pem"), filepath.Join(mixed, "client-cert.pem")},
		{filepath.Join(foreign, "client-key.pem"), filepath.Join(mixed, "client-key.pem")},
		{filepath.Join(creds, "ca-cert.pem"), filepath.Join(caOnly, "ca-cert.pem")},
	} {
		b, err := os.ReadFile(cp[0])
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(cp[1], b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	top, _ := hardChain(t, work)
	want := hardQemuRaw(t, top)
	s, r := hardServe(t, bin, "--tls-creds", creds, "--tls-required", top)
	if s == nil {
		t.Fatal(r)
	}
	tlsURI := func(dir string) string {
		return "nbds+unix:///?socket=" + s.socket + "&tls-certificates=" + dir
	}

	t.Run("plaintext-refused", func(t *testing.T) {
		if r := hardExec(30*time.Second, "nbdinfo", s.uri); r.code == 0 {
			t.Errorf("nbdinfo without TLS succeeded: %s", r.stdout)
		}
		if r := hardExec(30*time.Second, "nbdcopy", s.uri, "-"); r.code == 0 || len(r.stdout) != 0 {
			t.Errorf("nbdcopy without TLS: exit %d, %d bytes", r.code, len(r.stdout))
		}
		_, err := nbdclient.Dial(context.Background(), s.uri, nbdclient.Options{StructuredReplies: true})
		var se *nbdproto.ServerError
		if !errors.As(err, &se) || se.Reply != nbdproto.RepErrTLSReqd {
			t.Errorf("Go client without TLS: %v, want NBD_REP_ERR_TLS_REQD", err)
		}
		// NBD_OPT_EXPORT_NAME cannot be refused with a reply: the
		// server must drop the connection without sending the export.
		rc, err := hardDialRaw("unix", s.socket)
		if err != nil {
			t.Fatal(err)
		}
		defer rc.Close()
		rc.SetDeadline(time.Now().Add(10 * time.Second))
		rc.Write(append(hardBE.AppendUint32(nil, nbdproto.ClientFixedNewstyle|nbdproto.ClientNoZeroes), hardOpt(nbdproto.OptExportName, nil)...))
		if b, err := io.ReadAll(rc.r); len(b) != 0 || err != nil {
			t.Errorf("NBD_OPT_EXPORT_NAME without TLS: got %d bytes, %v; want the connection closed", len(b), err)
		}
		// Every other option gets NBD_REP_ERR_TLS_REQD.
		rc2, err := hardDialRaw("unix", s.socket)
		if err != nil {
			t.Fatal(err)
		}
		defer rc2.Close()
		rc2.SetDeadline(time.Now().Add(10 * time.Second))
		rc2.Write(hardBE.AppendUint32(nil, nbdproto.ClientFixedNewstyle|nbdproto.ClientNoZeroes))
		for _, opt := range []nbdproto.Option{nbdproto.OptList, nbdproto.OptGo, nbdproto.OptStructuredReply, nbdproto.OptSetMetaContext, nbdproto.OptExtendedHeaders} {
			data := []byte(nil)
			if opt == nbdproto.OptGo {
				data = hardGoData()
			}
			rc2.Write(hardOpt(opt, data))
			if typ, err := rc2.finalReply(); err != nil || typ != nbdproto.RepErrTLSReqd {
				t.Errorf("option %d without TLS: reply %#x, %v", opt, typ, err)
			}
		}
	})

	t.Run("trusted-client", func(t *testing.T) {
		r := hardExec(60*time.Second, "nbdcopy", tlsURI(creds), "-")
		if r.code != 0 || !bytes.Equal(r.stdout, want) {
			t.Errorf("nbdcopy over TLS: exit %d, %d bytes, equal to qemu-img convert: %v\n%s", r.code, len(r.stdout), bytes.Equal(r.stdout, want), r.stderr)
		}
		if r := hardExec(30*time.Second, "nbdinfo", "--map=qemu:joint-allocation", tlsURI(creds)); r.code != 0 {
			t.Errorf("nbdinfo --map over TLS: %s", r)
		}
	})

	t.Run("untrusted-client-certificate", func(t *testing.T) {
		r := hardExec(30*time.Second, "nbdinfo", "--size", tlsURI(mixed))
		if r.code == 0 {
			t.Errorf("nbdinfo with a client certificate from a foreign CA was let in: %s", r.stdout)
		}
		cfg, err := nbdproto.LoadClientTLS(mixed)
		if err != nil {
			t.Fatal(err)
		}
		cfg.ServerName = "localhost"
		if c, err := nbdclient.Dial(context.Background(), s.uri, nbdclient.Options{TLS: cfg}); err == nil {
			c.Close()
			t.Error("Go client with a foreign client certificate was let in")
		}
		// A client with no certificate at all is refused, as QEMU's
		// tls-creds-x509 (verify-peer=yes by default) refuses it.
		if r := hardExec(30*time.Second, "nbdinfo", "--size", tlsURI(caOnly)); r.code == 0 {
			t.Errorf("a TLS client without a certificate was let in")
		}
	})

	t.Run("stalled-tls-handshake", func(t *testing.T) {
		// Through the binary the handshake deadline is
		// nbdserver.DefaultHandshakeTimeout (10 s): checked in full
		// mode only (scripts/check.sh). The Go test checks the same code
		// with a short timeout in-process, below.
		stalled := []struct {
			name  string
			after []byte // sent after NBD_OPT_STARTTLS is acknowledged
		}{
			{"silent after STARTTLS", nil},
			{"half a ClientHello", []byte{0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00}},
		}
		timeout := 5 * time.Second
		uri := s.socket
		if os.Getenv("NBDGW_HARDENING_FULL") == "" {
			srvTLS, err := nbdproto.LoadServerTLS(creds, true)
			if err != nil {
				t.Fatal(err)
			}
			img := hardOpenImage(t, top)
			srv := nbdserver.NewServer(nbdserver.Config{Exports: []*nbdserver.Export{{Image: img}}, TLS: srvTLS, TLSRequired: true, HandshakeTimeout: 2 * time.Second})
			uri = filepath.Join(t.TempDir(), "inproc")
			l, err := net.Listen("unix", uri)
			if err != nil {
				t.Fatal(err)
			}
			go srv.Serve(context.Background(), l)
			t.Cleanup(func() { srv.Close() })
		} else {
			timeout = nbdserver.DefaultHandshakeTimeout + 15*time.Second
		}
		var wg sync.WaitGroup
		for _, st := range stalled {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rc, err := hardDialRaw("unix", uri)
				if err != nil {
					t.Error(err)
					return
				}
				defer rc.Close()
				rc.SetDeadline(time.Now().Add(timeout + 10*time.Second))
				rc.Write(append(hardBE.AppendUint32(nil, nbdproto.ClientFixedNewstyle|nbdproto.ClientNoZeroes), hardOpt(nbdproto.OptStartTLS, nil)...))
				if typ, _, err := rc.optReply(); err != nil || typ != nbdproto.RepAck {
					t.Errorf("%s: STARTTLS reply %#x, %v", st.name, typ, err)
					return
				}
				rc.Write(st.after)
				start := time.Now()
				io.Copy(io.Discard, rc.r) // until the server closes
				if d := time.Since(start); d > timeout {
					t.Errorf("%s: connection still open after %v: BUG: a stalled TLS handshake is not timed out", st.name, d.Round(time.Second))
				} else {
					t.Logf("%s: dropped after %v", st.name, d.Round(100*time.Millisecond))
				}
			}()
		}
		// Meanwhile a trusted client is served.
		if r := hardExec(30*time.Second, "nbdinfo", "--size", tlsURI(creds)); r.code != 0 {
			t.Errorf("trusted client while others stall: %s", r)
		}
		wg.Wait()
	})
	r = s.stop(t)
	hardSane(t, r)
}

func hardOpenImage(t testing.TB, path string) *qcow2.Image {
	t.Helper()
	img, err := qcow2.Open(path, qcow2.Options{Warn: func(string) {}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() })
	return img
}

// TestHardeningServerMemoryBudget: clients that ask for the largest reads
// and never read the replies must not make the server allocate without
// bound. nbdserver bounds each connection (MaxInFlight x MaxRequest =
// 16 x 32 MiB = 512 MiB) but nothing bounds their sum: MaxConnections
// (256) such clients could pin 128 GiB. Allocated clusters go out with
// sendfile from the host file (no buffer); compressed clusters (and TLS)
// are read into memory. This test opens 4 stalled clients on each kind
// of image and asks the server to stay under 1 GiB (4 such clients may
// pin 2 GiB today).
func TestHardeningServerMemoryBudget(t *testing.T) {
	t.Parallel()
	hardRequire(t, "qemu-img", "qemu-io")
	bin := nbdgwBinary(t)
	dir := t.TempDir()
	raw, plain, zipped := filepath.Join(dir, "a.raw"), filepath.Join(dir, "plain.qcow2"), filepath.Join(dir, "compressed.qcow2")
	for _, s := range [][]string{
		{"qemu-img", "create", "-q", "-f", "raw", raw, "64M"},
		{"qemu-io", "-f", "raw", "-c", "write -q -P 0x55 0 64M", raw},
		{"qemu-img", "convert", "-O", "qcow2", raw, plain},
		{"qemu-img", "convert", "-c", "-O", "qcow2", raw, zipped},
	} {
		if r := hardExec(60*time.Second, s[0], s[1:]...); r.code != 0 {
			t.Fatal(r)
		}
	}
	for _, img := range []string{plain, zipped} {
		t.Run(filepath.Base(img), func(t *testing.T) {
			s, r := hardServe(t, bin, img)
			if s == nil {
				t.Fatal(r)
			}
			const clients = 4
			for k := 0; k < clients; k++ {
				rc, err := hardHandshake("unix", s.socket, 0)
				if err != nil {
					t.Fatal(err)
				}
				defer rc.Close()
				go func() {
					for j := 0; j < 32; j++ {
						if _, err := rc.Write(hardReq(false, 0, nbdproto.CmdRead, uint64(j), 0, 32<<20)); err != nil {
							return
						}
					}
				}()
			}
			rss := hardPeakRSS(s.cmd.Process.Pid, 2*time.Second, 30*time.Second)
			t.Logf("%d clients asking 32 reads of 32 MiB each, reading nothing: server RSS %d MiB", clients, rss>>20)
			if rss > 1<<30 {
				t.Errorf("SERVER BUG (nbdserver): %d stalled clients make the server hold %d MiB: no server-wide budget for read buffers (suggest a weighted semaphore on request bytes, and a write deadline for clients that never drain replies)", clients, rss>>20)
			}
		})
	}
}

// TestHardeningBlockStatusAmplification: a 40 MiB file can describe a
// 2 EiB disk whose 4 Mi L1 entries all name one zeroed 2 MiB L2 table.
// Mapping it all means scanning that table 4 Mi times (qemu-img map takes
// minutes too); with extended headers one NBD_CMD_BLOCK_STATUS may ask
// for the whole export, so one small request buys minutes of server CPU,
// 16 in flight per connection, and the walk goes on after the client has
// gone. The server must answer (a partial answer is allowed by the
// protocol) within a few seconds.
func TestHardeningBlockStatusAmplification(t *testing.T) {
	t.Parallel()
	hardRequire(t, "qemu-img")
	bin := nbdgwBinary(t)
	img := filepath.Join(t.TempDir(), "big.qcow2")
	if r := hardExec(60*time.Second, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", img, "2047P"); r.code != 0 {
		t.Fatal(r)
	}
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	var h [48]byte
	if _, err := f.ReadAt(h[:], 0); err != nil {
		t.Fatal(err)
	}
	l1Size, l1Off := hardBE.Uint32(h[36:]), hardBE.Uint64(h[40:])
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	l2 := (uint64(fi.Size()) + 2<<20 - 1) &^ (2<<20 - 1)
	if err := f.Truncate(int64(l2 + 2<<20)); err != nil {
		t.Fatal(err)
	}
	l1 := make([]byte, 0, l1Size*8)
	for i := uint32(0); i < l1Size; i++ {
		l1 = hardBE.AppendUint64(l1, 1<<63|l2)
	}
	if _, err := f.WriteAt(l1, int64(l1Off)); err != nil {
		t.Fatal(err)
	}
	f.Close()

	s, r := hardServe(t, bin, img)
	if s == nil {
		t.Fatal(r)
	}
	rc, err := hardHandshake("unix", s.socket, nbdproto.OptExtendedHeaders, metactx.BaseAllocation)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	const limit = 10 * time.Second
	rc.SetDeadline(time.Now().Add(limit))
	start := time.Now()
	rc.Write(hardReq(true, 0, nbdproto.CmdBlockStatus, 1, 0, 2047<<50))
	if _, err := rc.extendedErrno(); err != nil {
		t.Errorf("SERVER/ENGINE BUG: one extended NBD_CMD_BLOCK_STATUS of a 2 EiB export (a 40 MiB file) got no answer in %v: %v", limit, err)
	} else {
		t.Logf("answered in %v", time.Since(start).Round(time.Millisecond))
	}
	rc.Close()
	// SIGTERM must still stop the server promptly.
	r = s.stop(t)
	if r.timedOut {
		t.Errorf("SERVER BUG: nbdgw serve did not exit within 10 s of SIGTERM while a block status walk was running (the graceful stop waits for it)")
	}
	hardSaneLimit(t, r, 1<<30)
}
