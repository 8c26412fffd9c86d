package backup

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nbdgw/nbdgw/nbdserver"
	"github.com/nbdgw/nbdgw/qcow2"
)

// run runs a QEMU tool in dir and returns its standard output.
func run(t testing.TB, dir, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	out, err := cmd.Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		t.Fatalf("%s %q: %v\n%s%s", name, args, err, out, stderr)
	}
	return string(out)
}

// alone is how QEMU opens a qcow2 file without its backing file.
func alone(path string) string {
	return fmt.Sprintf(`json:{"driver":"qcow2","backing":null,"file":{"driver":"file","filename":%q}}`, path)
}

// mapEntry is one qemu-img map --output=json entry, less its offset.
type mapEntry struct {
	Start, Length int64
	Depth         int
	Present       bool
	Zero          bool
	Data          bool
	Compressed    bool
}

// qemuMap is qemu-img map --output=json of spec with offsets dropped and
// entries that then look alike merged (qemu-img merges only entries whose
// host offsets are contiguous, and OUT's clusters lie elsewhere). With
// noCompressed the compressed field is dropped too.
func qemuMap(t testing.TB, dir, spec string, noCompressed bool) []mapEntry {
	t.Helper()
	var es []mapEntry
	if err := json.Unmarshal([]byte(run(t, dir, "qemu-img", "map", "--output=json", spec)), &es); err != nil {
		t.Fatal(err)
	}
	var out []mapEntry
	for _, e := range es {
		if noCompressed {
			e.Compressed = false
		}
		if n := len(out); n > 0 {
			p := out[n-1]
			p.Start, p.Length = e.Start, e.Length
			if p == e {
				out[n-1].Length += e.Length
				continue
			}
		}
		out = append(out, e)
	}
	return out
}

// checkLayer: OUT alone maps as the top layer alone, OUT over its backing
// reads as the source chain, and OUT passes qemu-img check.
func checkLayer(t *testing.T, dir, top, out string) {
	t.Helper()
	run(t, dir, "qemu-img", "check", out)
	want := qemuMap(t, dir, alone(top), true)
	got := qemuMap(t, dir, alone(out), true)
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("qemu-img map of OUT alone:\n%v\nof the top layer alone:\n%v", got, want)
	}
	if s := run(t, dir, "qemu-img", "compare", out, top); !strings.Contains(s, "identical") {
		t.Errorf("qemu-img compare: %s", s)
	}
}

// checkFull: OUT is standalone, reads as the source, passes qemu-img
// check, and holds no data cluster where the source reads as zero.
func checkFull(t *testing.T, dir, src, out string) {
	t.Helper()
	run(t, dir, "qemu-img", "check", out)
	if s := run(t, dir, "qemu-img", "info", out); strings.Contains(s, "backing file") {
		t.Errorf("full backup has a backing file:\n%s", s)
	}
	if s := run(t, dir, "qemu-img", "compare", out, src); !strings.Contains(s, "identical") {
		t.Errorf("qemu-img compare: %s", s)
	}
	srcMap := qemuMap(t, dir, src, true)
	for _, e := range qemuMap(t, dir, out, true) {
		if !e.Data || e.Zero {
			continue
		}
		for _, s := range srcMap {
			if s.Zero && s.Start < e.Start+e.Length && e.Start < s.Start+s.Length {
				t.Errorf("OUT has data at [%d, +%d) where the source reads zero [%d, +%d)", e.Start, e.Length, s.Start, s.Length)
			}
		}
	}
}

// serve serves img over NBD on a unix socket until the test ends.
func serve(t testing.TB, img *qcow2.Image) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := nbdserver.NewServer(nbdserver.Config{Exports: []*nbdserver.Export{{Image: img}}})
	done := make(chan error, 1)
	go func() { done <- srv.Serve(context.Background(), l) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-done; err != nil && !errors.Is(err, nbdserver.ErrServerClosed) {
			t.Errorf("Serve: %v", err)
		}
	})
	return "nbd+unix:///?socket=" + sock
}

func openImage(t testing.TB, path string, o qcow2.Options) *qcow2.Image {
	t.Helper()
	img, err := qcow2.Open(path, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() })
	return img
}

func requireQemu(t testing.TB) {
	for _, tool := range []string{"qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed", tool)
		}
	}
}

// layerCase is a top layer over a base, built with QEMU's tools.
type layerCase struct {
	name   string
	create []string // qemu-img create options of top.qcow2 (besides -b)
	size   string   // virtual size
	base   string   // "raw" or "qcow2"
	baseIO []string // qemu-io commands on the base
	topIO  []string // qemu-io commands on the top layer
}

var layerCases = []layerCase{
	{name: "seed", size: "256K", base: "raw",
		baseIO: []string{"write -P 65 0 64k", "write -P 66 64k 64k", "write -P 67 128k 64k"},
		topIO:  []string{"write -P 69 64k 64k", "write -z 128k 64k"}},
	{name: "discards", size: "4M", base: "qcow2",
		baseIO: []string{"write -P 1 0 4M"},
		topIO:  []string{"write -P 2 0 1M", "discard 256k 256k", "write -z 2M 128k", "write -P 3 3M 4k", "write -z -u 3584k 64k"}},
	{name: "compressed", size: "1M", base: "qcow2",
		baseIO: []string{"write -P 1 0 1M"},
		topIO:  []string{"write -c -P 5 0 64k", "write -c -P 6 128k 64k", "write -c -P 0 256k 64k", "write -z 512k 64k"}},
	{name: "subclusters", size: "2M", base: "qcow2", create: []string{"-o", "extended_l2=on,cluster_size=64k"},
		baseIO: []string{"write -P 1 0 2M"},
		topIO:  []string{"write -P 7 4k 4k", "write -z 16k 8k", "write -P 8 70k 2k", "write -z 128k 64k", "write -P 9 1M 128k", "write -z 1032k 4k"}},
	{name: "c512", size: "300K", base: "raw", create: []string{"-o", "cluster_size=512"},
		baseIO: []string{"write -P 1 0 300k"},
		topIO:  []string{"write -P 2 512 1k", "write -z 4k 512", "write -P 3 100k 7k", "write -z 200k 4k"}},
	{name: "c2m", size: "9M", base: "qcow2", create: []string{"-o", "cluster_size=2M"},
		baseIO: []string{"write -P 1 0 9M"},
		topIO:  []string{"write -P 2 0 4k", "write -z 4M 2M", "write -P 3 8M 1M"}},
	{name: "odd", size: "3146240", base: "raw", // 3 MiB + 1536 bytes
		baseIO: []string{"write -P 1 0 3146240"},
		topIO:  []string{"write -P 3 3146000 240", "write -P 2 2M 512", "write -z 1M 64k"}},
	{name: "sparse-1T", size: "1T", base: "qcow2",
		baseIO: []string{"write -P 1 0 64k", "write -P 1 512G 64k"},
		topIO:  []string{"write -P 2 0 64k", "write -z 512G 64k", "write -P 3 700G 64k", "write -P 4 1048575M 1M"}},
}

// build makes base and top.qcow2 in dir.
func (c layerCase) build(t testing.TB, dir string) (top, base string) {
	t.Helper()
	base = "base." + c.base
	run(t, dir, "qemu-img", "create", "-q", "-f", c.base, base, c.size)
	for _, cmd := range c.baseIO {
		run(t, dir, "qemu-io", "-f", c.base, "-c", cmd, base)
	}
	args := append([]string{"create", "-q", "-f", "qcow2", "-b", base, "-F", c.base}, c.create...)
	run(t, dir, "qemu-img", append(args, "top.qcow2")...)
	for _, cmd := range c.topIO {
		run(t, dir, "qemu-io", "-f", "qcow2", "-c", cmd, "top.qcow2")
	}
	return "top.qcow2", base
}

// TestLayer: a layer backup from a local image and from an NBD export of
// the top layer alone (and of the whole chain) reproduces the layer.
func TestLayer(t *testing.T) {
	requireQemu(t)
	for _, c := range layerCases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			top, base := c.build(t, dir)
			at := func(s string) string { return filepath.Join(dir, s) }
			// Local source: the chain opened as it is.
			st, err := Run(context.Background(), at(top), at("local.qcow2"), Options{Mode: Layer, Backing: at(base)})
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("local: %v", st)
			checkLayer(t, dir, top, "local.qcow2")
			if g, w := geometryOf(t, dir, "local.qcow2"), geometryOf(t, dir, top); g != w {
				t.Errorf("OUT's geometry %s, the source's %s", g, w)
			}
			// NBD, top layer alone (the seed's setup) and the whole chain.
			for _, noBacking := range []bool{true, false} {
				img := openImage(t, at(top), qcow2.Options{NoBacking: noBacking})
				out := fmt.Sprintf("nbd-%v.qcow2", noBacking)
				st, err := Run(context.Background(), serve(t, img), at(out), Options{Mode: Layer, Backing: at(base)})
				if err != nil {
					t.Fatal(err)
				}
				if !strings.Contains(st.Used, "qemu:joint-allocation") {
					t.Errorf("used %s", st.Used)
				}
				t.Logf("nbd no-backing=%v: %v", noBacking, st)
				checkLayer(t, dir, top, out)
			}
		})
	}
}

// geometryOf is qemu-img info's cluster size and extended-L2 bit.
func geometryOf(t *testing.T, dir, path string) string {
	var info struct {
		ClusterSize int64 `json:"cluster-size"`
		Format      struct {
			Data struct {
				ExtendedL2 bool `json:"extended-l2"`
			} `json:"data"`
		} `json:"format-specific"`
	}
	if err := json.Unmarshal([]byte(run(t, dir, "qemu-img", "info", "--output=json", path)), &info); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("cluster_size=%d,extended_l2=%v", info.ClusterSize, info.Format.Data.ExtendedL2)
}

// TestGeometryOption: -o sets OUT's geometry, and the layer still maps as
// the source's.
func TestGeometryOption(t *testing.T) {
	requireQemu(t)
	dir := t.TempDir()
	top, base := layerCases[1].build(t, dir) // 64 KiB clusters, no subclusters
	cs, ext, err := ParseCreateOptions("cluster_size=128k,extended_l2=on")
	if err != nil {
		t.Fatal(err)
	}
	img := openImage(t, filepath.Join(dir, top), qcow2.Options{NoBacking: true})
	o := Options{Mode: Layer, Backing: filepath.Join(dir, base), ClusterSize: cs, ExtendedL2: ext}
	if _, err := Run(context.Background(), serve(t, img), filepath.Join(dir, "out.qcow2"), o); err != nil {
		t.Fatal(err)
	}
	if g := geometryOf(t, dir, "out.qcow2"); g != "cluster_size=131072,extended_l2=true" {
		t.Errorf("geometry %s", g)
	}
	checkLayer(t, dir, top, "out.qcow2")
	// cluster_size alone: no subclusters, even where the source's
	// granularity (512 B clusters here) would have asked for them.
	dir = t.TempDir()
	top, base = layerCases[4].build(t, dir)
	img = openImage(t, filepath.Join(dir, top), qcow2.Options{NoBacking: true})
	o = Options{Mode: Layer, Backing: filepath.Join(dir, base), ClusterSize: 512}
	if _, err := Run(context.Background(), serve(t, img), filepath.Join(dir, "out.qcow2"), o); err != nil {
		t.Fatal(err)
	}
	if g := geometryOf(t, dir, "out.qcow2"); g != "cluster_size=512,extended_l2=false" {
		t.Errorf("geometry %s", g)
	}
	checkLayer(t, dir, top, "out.qcow2")
}

// TestSeed: the seed's example, top.qcow2 over base.raw served without
// its backing file, rebuilt over base.raw reads A, E, zeroes, zeroes.
func TestSeed(t *testing.T) {
	requireQemu(t)
	dir := t.TempDir()
	top, base := layerCases[0].build(t, dir)
	img := openImage(t, filepath.Join(dir, top), qcow2.Options{NoBacking: true})
	out := filepath.Join(dir, "out.qcow2")
	if _, err := Run(context.Background(), serve(t, img), out, Options{Mode: Layer, Backing: filepath.Join(dir, base)}); err != nil {
		t.Fatal(err)
	}
	for i, p := range []int{65, 69, 0, 0} {
		s := run(t, dir, "qemu-io", "-r", "-f", "qcow2", "-c", fmt.Sprintf("read -P %d %d 64k", p, i*65536), "out.qcow2")
		if strings.Contains(s, "Pattern verification failed") {
			t.Errorf("cluster %d is not %d: %s", i, p, s)
		}
	}
	if s := run(t, dir, "qemu-img", "info", "out.qcow2"); !strings.Contains(s, "backing file: base.raw") || !strings.Contains(s, "backing file format: raw") {
		t.Errorf("OUT's header does not name base.raw relative to it:\n%s", s)
	}
}

// TestFull: a full backup is standalone, sparse and reads as the chain.
func TestFull(t *testing.T) {
	requireQemu(t)
	for _, c := range layerCases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			top, _ := c.build(t, dir)
			at := func(s string) string { return filepath.Join(dir, s) }
			st, err := Run(context.Background(), at(top), at("local.qcow2"), Options{})
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("local: %v", st)
			checkFull(t, dir, top, "local.qcow2")
			img := openImage(t, at(top), qcow2.Options{})
			if st, err = Run(context.Background(), serve(t, img), at("nbd.qcow2"), Options{Connections: 3}); err != nil {
				t.Fatal(err)
			}
			t.Logf("nbd: %v", st)
			if !strings.Contains(st.Used, "3 connection") {
				t.Errorf("used %s", st.Used)
			}
			checkFull(t, dir, top, "nbd.qcow2")
		})
	}
}

// TestIncremental: full <- incr1 <- incr2 taken with bitmaps read as the
// source did at each point, from a local image and over NBD.
func TestIncremental(t *testing.T) {
	requireQemu(t)
	for _, viaNBD := range []bool{false, true} {
		t.Run(fmt.Sprintf("nbd=%v", viaNBD), func(t *testing.T) {
			dir := t.TempDir()
			at := func(s string) string { return filepath.Join(dir, s) }
			run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "8M")
			run(t, dir, "qemu-io", "-c", "write -P 1 0 6M", "img.qcow2")
			backup := func(out string, o Options) {
				t.Helper()
				// A subtest, so that the image and its server are closed
				// (and their locks released) before qemu-io writes again.
				t.Run(out, func(t *testing.T) {
					src := at("img.qcow2")
					if viaNBD {
						src = serve(t, openImage(t, src, qcow2.Options{}))
					}
					st, err := Run(context.Background(), src, at(out), o)
					if err != nil {
						t.Fatal(err)
					}
					t.Logf("%s: %v", out, st)
				})
				run(t, dir, "cp", "--sparse=always", "img.qcow2", "at-"+out)
				run(t, dir, "qemu-img", "check", out)
			}
			run(t, dir, "qemu-img", "bitmap", "--add", "img.qcow2", "b1")
			backup("full.qcow2", Options{})
			run(t, dir, "qemu-io", "-c", "write -P 2 1M 64k", "-c", "write -z 2M 1M", "-c", "discard 4M 64k", "-c", "write -P 3 7M 4k", "img.qcow2")
			run(t, dir, "qemu-img", "bitmap", "--add", "img.qcow2", "b2")
			backup("incr1.qcow2", Options{Mode: Incremental, Bitmap: "b1", Backing: at("full.qcow2")})
			run(t, dir, "qemu-io", "-c", "write -P 4 0 8k", "-c", "write -z 1M 64k", "-c", "write -P 5 5M 128k", "img.qcow2")
			backup("incr2.qcow2", Options{Mode: Incremental, Bitmap: "b2", Backing: at("incr1.qcow2")})
			for _, out := range []string{"full.qcow2", "incr1.qcow2", "incr2.qcow2"} {
				if s := run(t, dir, "qemu-img", "compare", out, "at-"+out); !strings.Contains(s, "identical") {
					t.Errorf("%s: %s", out, s)
				}
			}
			// Only the dirty ranges went into the increments.
			var incr1 []mapEntry
			for _, e := range qemuMap(t, dir, alone("incr2.qcow2"), true) {
				if e.Present {
					incr1 = append(incr1, e)
				}
			}
			if len(incr1) == 0 || incr1[len(incr1)-1].Start+incr1[len(incr1)-1].Length > 5<<20+128<<10 {
				t.Errorf("incr2 holds more than the ranges written since incr1: %v", incr1)
			}
		})
	}
}

// TestRefusals: bad input fails with a clear error and leaves no OUT.
func TestRefusals(t *testing.T) {
	requireQemu(t)
	dir := t.TempDir()
	at := func(s string) string { return filepath.Join(dir, s) }
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "1M")
	run(t, dir, "qemu-img", "create", "-q", "-f", "raw", "small.raw", "512K")
	run(t, dir, "qemu-img", "create", "-q", "-f", "raw", "exists.qcow2", "1M")
	img := openImage(t, at("img.qcow2"), qcow2.Options{})
	uri := serve(t, img)
	for _, c := range []struct {
		name, src, out string
		o              Options
		want           string
	}{
		{"exists", at("img.qcow2"), at("exists.qcow2"), Options{}, "exists (use --force"},
		{"no-bitmap-local", at("img.qcow2"), at("o1.qcow2"), Options{Mode: Incremental, Bitmap: "nope"}, `no such bitmap "nope"`},
		{"no-bitmap-nbd", uri, at("o2.qcow2"), Options{Mode: Incremental, Bitmap: "nope"}, `has no bitmap "nope"`},
		{"backing-size", uri, at("o3.qcow2"), Options{Mode: Layer, Backing: at("small.raw")}, "is 524288 bytes, the source 1048576"},
		{"full-backing", uri, at("o4.qcow2"), Options{Backing: at("small.raw")}, "--backing needs --layer or --bitmap"},
		{"bad-geometry", uri, at("o5.qcow2"), Options{ClusterSize: 4096, ExtendedL2: new(true)}, "extended_l2 needs cluster_size of 16K"},
		{"same-file", at("img.qcow2"), at("img.qcow2"), Options{Force: true}, "refusing to replace what the backup reads"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := Run(context.Background(), c.src, c.out, c.o)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %v, want %q", err, c.want)
			}
			if c.name != "exists" && c.name != "same-file" {
				if _, err := os.Stat(c.out); err == nil {
					t.Errorf("%s left behind", c.out)
				}
			}
			if left, _ := filepath.Glob(at(".*.partial")); len(left) > 0 {
				t.Errorf("temporary files left: %v", left)
			}
		})
	}
	// --force replaces.
	if _, err := Run(context.Background(), uri, at("exists.qcow2"), Options{Force: true}); err != nil {
		t.Fatal(err)
	}
	checkFull(t, dir, "img.qcow2", "exists.qcow2")
}

// TestCancel: a cancelled backup leaves nothing.
func TestCancel(t *testing.T) {
	requireQemu(t)
	dir := t.TempDir()
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "64M")
	run(t, dir, "qemu-io", "-c", "write -P 1 0 64M", "img.qcow2")
	ctx, cancel := context.WithCancel(context.Background())
	o := Options{Progress: func(done, total int64) {}}
	o.Note = func(string) { cancel() } // cancelled before any copy
	_, err := Run(ctx, filepath.Join(dir, "img.qcow2"), filepath.Join(dir, "out.qcow2"), o)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("error %v, want context.Canceled", err)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "*out.qcow2*")); len(left) > 0 {
		t.Errorf("left behind: %v", left)
	}
}

func TestParseCreateOptions(t *testing.T) {
	cs, ext, err := ParseCreateOptions("cluster_size=128k,extended_l2=on")
	if err != nil || cs != 128<<10 || ext == nil || !*ext {
		t.Errorf("got %d %v %v", cs, ext, err)
	}
	for _, bad := range []string{"cluster_size=3000", "cluster_size=4M", "extended_l2=maybe", "preallocation=full", "cluster_size"} {
		if _, _, err := ParseCreateOptions(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestMerge(t *testing.T) {
	a := []ext{{0, 10, 1}, {10, 5, 2}, {15, 5, 3}}
	b := []ext{{0, 3, 7}, {3, 17, 8}}
	var got []string
	merge(a, b, func(off, n int64, fa, fb uint32) error {
		got = append(got, fmt.Sprintf("%d+%d:%d/%d", off, n, fa, fb))
		return nil
	})
	if s := strings.Join(got, " "); s != "0+3:1/7 3+7:1/8 10+5:2/8 15+5:3/8" {
		t.Errorf("merge: %s", s)
	}
}

// TestOddSizes: an empty source and one whose size is not a multiple of
// 512 bytes, over NBD and locally.
func TestOddSizes(t *testing.T) {
	requireQemu(t)
	dir := t.TempDir()
	at := func(s string) string { return filepath.Join(dir, s) }
	b := make([]byte, 100001)
	for i := range b[:70000] {
		b[i] = byte(i%251 + 1)
	}
	os.WriteFile(at("odd.raw"), b, 0o644)
	os.WriteFile(at("empty.raw"), nil, 0o644)
	for _, name := range []string{"odd.raw", "empty.raw"} {
		img := openImage(t, at(name), qcow2.Options{Format: "raw"})
		for i, src := range []string{at(name), serve(t, img)} {
			out := fmt.Sprintf("%s-%d.qcow2", name, i)
			if _, err := Run(context.Background(), src, at(out), Options{Image: qcow2.Options{Format: "raw"}}); err != nil {
				t.Fatal(err)
			}
			run(t, dir, "qemu-img", "check", out)
			if s := run(t, dir, "qemu-img", "compare", "-f", "raw", name, out); !strings.Contains(s, "identical") {
				t.Errorf("%s: %s", out, s)
			}
		}
	}
}

// TestResizedExport: an export that has another size once the copy is
// done fails the backup (the first connection reaches one image, later
// ones another).
func TestResizedExport(t *testing.T) {
	requireQemu(t)
	dir := t.TempDir()
	at := func(s string) string { return filepath.Join(dir, s) }
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "a.qcow2", "1M")
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "b.qcow2", "2M")
	sockOf := func(uri string) string { return strings.TrimPrefix(uri, "nbd+unix:///?socket=") }
	a := sockOf(serve(t, openImage(t, at("a.qcow2"), qcow2.Options{})))
	b := sockOf(serve(t, openImage(t, at("b.qcow2"), qcow2.Options{})))
	l, err := net.Listen("unix", at("p.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for n := 0; ; n++ {
			c, err := l.Accept()
			if err != nil {
				return
			}
			target := a
			if n > 0 {
				target = b
			}
			s, err := net.Dial("unix", target)
			if err != nil {
				c.Close()
				continue
			}
			go func() { io.Copy(s, c); s.Close() }()
			go func() { io.Copy(c, s); c.Close() }()
		}
	}()
	_, err = Run(context.Background(), "nbd+unix:///?socket="+at("p.sock"), at("out.qcow2"), Options{Connections: 1})
	if err == nil || !strings.Contains(err.Error(), "the export changed size during the backup: 1048576 bytes, now 2097152") {
		t.Fatalf("error %v", err)
	}
	if left, _ := filepath.Glob(at("*out.qcow2*")); len(left) > 0 {
		t.Errorf("left behind: %v", left)
	}
}
