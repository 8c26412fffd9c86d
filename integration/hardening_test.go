package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nbdgw/nbdgw/internal/corpus"
	"github.com/nbdgw/nbdgw/metactx"
	"github.com/nbdgw/nbdgw/nbdserver"
)

// TestHardeningCorpus drives every crafted image of package corpus
// through every front end as a user would: nbdgw map (qemu-img form and
// each --context), nbdgw info, nbdgw serve with nbdinfo --map, nbdcopy
// and the Go client, and nbdgw mount with cat. Each must fail with an
// error naming the broken structure (exit status 1 for the CLI), or, for
// images QEMU reads without complaint, agree with qemu-img byte for byte;
// never panic, never hang, never exceed hardMaxRSS.
func TestHardeningCorpus(t *testing.T) {
	hardRequire(t, "qemu-img", "qemu-io", "nbdinfo", "nbdcopy")
	bin := hardBinary(t)
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
			if fuse == "" {
				hardCorpusMount(t, bin, c, want)
			}
		})
	}
	if fuse != "" {
		t.Logf("FUSE part skipped: %s", fuse)
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
	for _, x := range cmds {
		r := hardExec(30*time.Second, bin, x.args...)
		hardSane(t, r)
		if x.args[0] == "map" && x.args[1] == c.Image && r.code == 1 && bytes.Contains(r.stderr, []byte("compressed clusters")) {
			continue // qemu-img map's human form refuses compressed clusters too
		}
		switch {
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
	cl, err := nbdserver.Dial(ctx, s.uri, nbdserver.ClientOptions{StructuredReplies: true, MetaContexts: hardContexts(c)})
	if err != nil {
		t.Fatalf("Go client: %v", err)
	}
	defer cl.Close()
	buf := make([]byte, cl.Size())
	_, err = cl.ReadAt(buf, 0)
	var se *nbdserver.ServerError
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
	hardRequire(t, "qemu-img")
	bin := hardBinary(t)
	dir := t.TempDir()
	// A chain of 64 layers (the limit), each with an L1 table of 32 MiB
	// (QEMU's limit) in a sparse file: 2 GiB of L1 tables if all loaded.
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
