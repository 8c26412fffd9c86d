package integration

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nbdgw/nbdgw/internal/metactx"
	"github.com/nbdgw/nbdgw/qcow2"
)

// fuseRequire skips the test unless real FUSE mounts can be made here.
func fuseRequire(t *testing.T, tools ...string) {
	t.Helper()
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skipf("no /dev/fuse: %v", err)
	}
	for _, tool := range append([]string{"fusermount3", "qemu-img", "qemu-io"}, tools...) {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed: %v", tool, err)
		}
	}
}

// fuseMounted reports whether dir is a mount point, from mountinfo.
func fuseMounted(t *testing.T, dir string) bool {
	t.Helper()
	return hardMounted(dir)
}

// fuseMount is one running `nbdgw mount`.
type fuseMount struct {
	dir    string
	cmd    *exec.Cmd
	stderr *lockedBuffer
	exited chan struct{}
	err    error // set when exited is closed
}

// fuseStart runs `nbdgw mount ARGS... IMAGE DIR` and waits until DIR is
// mounted. The cleanup unmounts (SIGINT, then fusermount3 -u -z) and reaps
// the process.
func fuseStart(t *testing.T, bin, image string, args ...string) *fuseMount {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return fuseStartAt(t, bin, image, dir, args...)
}

func fuseStartAt(t *testing.T, bin, image, dir string, args ...string) *fuseMount {
	t.Helper()
	m := &fuseMount{dir: dir, stderr: &lockedBuffer{}, exited: make(chan struct{})}
	m.cmd = exec.Command(bin, append(append([]string{"mount"}, args...), image, dir)...)
	m.cmd.Stderr = m.stderr
	if err := m.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { m.err = m.cmd.Wait(); close(m.exited) }()
	t.Cleanup(func() {
		select {
		case <-m.exited:
		default:
			m.cmd.Process.Signal(syscall.SIGINT)
			select {
			case <-m.exited:
			case <-time.After(10 * time.Second):
				exec.Command("fusermount3", "-u", "-z", dir).Run()
				m.cmd.Process.Kill()
				<-m.exited
			}
		}
		if fuseMounted(t, dir) {
			exec.Command("fusermount3", "-u", "-z", dir).Run()
			t.Errorf("%s still mounted after nbdgw exited", dir)
		}
	})
	// Ready when nbdgw says so (it is then done touching its mount), and
	// the mount is there.
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(m.stderr.String(), " mounted on ") || !fuseMounted(t, dir) {
		select {
		case <-m.exited:
			t.Fatalf("nbdgw mount exited before mounting: %v\n%s", m.err, m.stderr)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not mounted after 20s; stderr:\n%s", dir, m.stderr)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return m
}

// said is what nbdgw mount wrote to stderr but its readiness line.
func (m *fuseMount) said() string {
	var keep []string
	for _, l := range strings.SplitAfter(m.stderr.String(), "\n") {
		if l != "" && !strings.Contains(l, " mounted on ") {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "")
}

// wait waits for the process to exit and returns its error.
func (m *fuseMount) wait(t *testing.T) error {
	t.Helper()
	select {
	case <-m.exited:
		return m.err
	case <-time.After(15 * time.Second):
		t.Fatalf("nbdgw mount did not exit; stderr:\n%s", m.stderr)
		return nil
	}
}

func fuseSHA(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatalf("reading %s: %v", path, err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

func fuseReadFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// fuseChain builds a two-layer qcow2 chain with data, zero clusters,
// compressed clusters, a discarded range and a persistent dirty bitmap b0.
// Every byte written is non-zero, so the data ranges of a sparse copy are
// exactly the data extents of block status.
func fuseChain(t *testing.T, dir string) (top, base string) {
	t.Helper()
	base = filepath.Join(dir, "base.qcow2")
	top = filepath.Join(dir, "top.qcow2")
	runOutput(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "64M")
	runOutput(t, "qemu-io", "-f", "qcow2",
		"-c", "write -P 0x11 0 4M",
		"-c", "write -c -P 0x12 8M 256k", // compressed clusters
		"-c", "write -P 0x13 16M 1M",
		"-c", "write -z 20M 1M", // zero clusters in the backing file
		"-c", "write -P 0x14 40M 3M",
		base)
	runOutput(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, "64M")
	runOutput(t, "qemu-img", "bitmap", "--add", top, "b0")
	runOutput(t, "qemu-io", "-f", "qcow2",
		"-c", "write -P 0x21 1M 1M",
		"-c", "write -z 2560k 512k", // zero clusters over backing data
		"-c", "write -c -P 0x22 12M 128k",
		"-c", "write -P 0x23 20M 64k",
		"-c", "discard 41M 1M",
		"-c", "write -P 0x24 63M 1M",
		top)
	return top, base
}

// fuseJSONSpec names layer depth of top opened alone, as qemu-nbd and
// qemu-img take it.
func fuseLayerSpec(file string) string {
	return fmt.Sprintf(`json:{"driver":"qcow2","backing":null,"file":{"driver":"file","filename":%q}}`, file)
}

func TestFUSEMount(t *testing.T) {
	fuseRequire(t)
	work := t.TempDir()
	bin := nbdgwBinary(t)
	top, base := fuseChain(t, work)
	chain := []string{top, base}
	before := map[string]string{}
	for _, f := range chain {
		before[f] = fuseSHA(t, f)
	}
	rawTop := filepath.Join(work, "top.raw")
	runOutput(t, "qemu-img", "convert", "-O", "raw", top, rawTop)

	t.Run("session", func(t *testing.T) {
		m := fuseStart(t, bin, top)
		t.Run("disk-sha256", func(t *testing.T) {
			if got, want := fuseSHA(t, filepath.Join(m.dir, "disk")), fuseSHA(t, rawTop); got != want {
				t.Errorf("disk sha256 %s, qemu-img convert -O raw %s", got, want)
			}
			layers := []struct{ file, spec string }{
				{filepath.Join(m.dir, "layers/1/disk"), fuseLayerSpec(top)},
				{filepath.Join(m.dir, "layers/2/disk"), base},
			}
			for _, l := range layers {
				raw := filepath.Join(t.TempDir(), "layer.raw")
				runOutput(t, "qemu-img", "convert", "-O", "raw", l.spec, raw)
				if got, want := fuseSHA(t, l.file), fuseSHA(t, raw); got != want {
					t.Errorf("%s sha256 %s, qemu-img convert %s", l.file, got, want)
				}
			}
		})
		t.Run("parallel-reads", func(t *testing.T) { fuseParallelReads(t, filepath.Join(m.dir, "disk"), rawTop) })
		t.Run("maps", func(t *testing.T) { fuseCheckMaps(t, bin, m.dir, top) })
		t.Run("sparse-copy", func(t *testing.T) { fuseSparseCopy(t, m.dir, top, rawTop) })
		t.Run("info-json", func(t *testing.T) {
			got := fuseReadFile(t, filepath.Join(m.dir, "info.json"))
			want := runOutput(t, bin, "info", "--output=json", top)
			if !bytes.Equal(got, want) {
				t.Errorf("info.json:\n%s\nnbdgw info --output=json:\n%s", got, want)
			}
		})
		t.Run("read-only", func(t *testing.T) { fuseReadOnly(t, m, chain) })
		if err := m.cmd.Process.Signal(syscall.SIGINT); err != nil {
			t.Fatal(err)
		}
		if err := m.wait(t); err != nil {
			t.Errorf("nbdgw mount after SIGINT: %v\n%s", err, m.stderr)
		}
		if fuseMounted(t, m.dir) {
			t.Errorf("still mounted after SIGINT")
		}
	})
	t.Run("partition-ext4", func(t *testing.T) { fusePartitionExt4(t, bin) })
	t.Run("no-backing", func(t *testing.T) {
		m := fuseStart(t, bin, top, "--no-backing")
		raw := filepath.Join(t.TempDir(), "top-alone.raw")
		runOutput(t, "qemu-img", "convert", "-O", "raw", fuseLayerSpec(top), raw)
		if got, want := fuseSHA(t, filepath.Join(m.dir, "disk")), fuseSHA(t, raw); got != want {
			t.Errorf("--no-backing disk sha256 %s, qemu-img convert %s", got, want)
		}
		if _, err := os.Stat(filepath.Join(m.dir, "layers", "2")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("--no-backing: layers/2: %v, want it absent", err)
		}
	})
	t.Run("many-extents", func(t *testing.T) { fuseManyExtents(t, bin, work) })
	t.Run("corrupt-l2-entry", func(t *testing.T) { fuseCorrupt(t, bin) })
	t.Run("lifecycle", func(t *testing.T) { fuseLifecycle(t, bin, top) })
	t.Run("bad-input", func(t *testing.T) { fuseBadInput(t, bin, top) })
	t.Run("chain-unchanged", func(t *testing.T) {
		for _, f := range chain {
			if got := fuseSHA(t, f); got != before[f] {
				t.Errorf("%s changed during the session: sha256 %s, was %s", f, got, before[f])
			}
		}
	})
}

// fuseParallelReads reads disk from 8 goroutines at random offsets and
// sizes and compares with the raw image.
func fuseParallelReads(t *testing.T, disk, raw string) {
	want := fuseReadFile(t, raw)
	f, err := os.Open(disk)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 7))
			buf := make([]byte, 3<<20)
			for range 40 {
				off := rng.Int64N(int64(len(want)))
				n := 1 + rng.IntN(len(buf))
				k, err := f.ReadAt(buf[:n], off)
				if err != nil && !(err == io.EOF && off+int64(k) == int64(len(want))) {
					errs <- fmt.Errorf("ReadAt(%d, %d): %v", n, off, err)
					return
				}
				if !bytes.Equal(buf[:k], want[off:off+int64(k)]) {
					errs <- fmt.Errorf("ReadAt(%d, %d): wrong data", n, off)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// fuseCheckMaps compares every file under maps/ and layers/N/maps/ with
// metactx.WriteMap and `nbdgw map --context`, and the contexts qemu-nbd
// serves with nbdinfo --map against qemu-nbd.
func fuseCheckMaps(t *testing.T, bin, dir, top string) {
	img, err := qcow2.Open(top, qcow2.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	views := []struct {
		dir       string
		img       *qcow2.Image
		nbdgwArgs []string // nbdgw map arguments selecting the image
		qemuNBD   []string // qemu-nbd arguments serving the same view
	}{
		{"maps", img, []string{top}, []string{"-f", "qcow2", top}},
	}
	for _, li := range img.Layers() {
		l, err := img.Layer(li.Depth)
		if err != nil {
			t.Fatal(err)
		}
		v := views[0]
		v.dir, v.img = fmt.Sprintf("layers/%d/maps", li.Depth), l
		if li.Depth == 1 {
			v.nbdgwArgs = []string{"--no-backing", top}
			v.qemuNBD = []string{fuseLayerSpec(top)}
		} else {
			v.nbdgwArgs = []string{li.Filename}
			v.qemuNBD = []string{"-f", li.Format, li.Filename}
		}
		views = append(views, v)
	}
	names := 0
	for _, v := range views {
		entries, err := os.ReadDir(filepath.Join(dir, v.dir))
		if err != nil {
			t.Fatal(err)
		}
		var files []string
		for _, e := range entries {
			files = append(files, e.Name())
		}
		var want []string
		for _, name := range metactx.Names(v.img) {
			want = append(want, fuseMapFile(name), fuseMapFile(name)+".json")
		}
		if strings.Join(sortedCopy(files), " ") != strings.Join(sortedCopy(want), " ") {
			t.Errorf("%s holds %v, want %v", v.dir, files, want)
		}
		for _, name := range metactx.Names(v.img) {
			for _, json := range []bool{false, true} {
				file := filepath.Join(dir, v.dir, fuseMapFile(name))
				if json {
					file += ".json"
				}
				got := fuseReadFile(t, file)
				var wm bytes.Buffer
				if err := metactx.WriteMap(&wm, v.img, name, json); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, wm.Bytes()) {
					t.Errorf("%s differs from metactx.WriteMap:\n%s\nwant:\n%s", file, got, wm.Bytes())
				}
				args := []string{"map", "--context", name}
				if json {
					args = append(args, "--output=json")
				}
				if cli := runOutput(t, bin, append(args, v.nbdgwArgs...)...); !bytes.Equal(got, cli) {
					t.Errorf("%s differs from nbdgw %q:\n%s\nwant:\n%s", file, append(args, v.nbdgwArgs...), got, cli)
				}
				// qemu-nbd serves base:allocation, allocation-depth
				// and the bitmaps; joint-allocation is ours alone.
				if name == metactx.JointAllocation {
					continue
				}
				qargs := append([]string{"-r", "-A"}, v.qemuNBD...)
				if bm, ok := strings.CutPrefix(name, metactx.DirtyBitmapPrefix); ok {
					qargs = append([]string{"-B", bm}, qargs...)
				}
				nargs := []string{"--map=" + name}
				if json {
					nargs = append(nargs, "--json")
				}
				nargs = append(append(append(nargs, "--", "[", "qemu-nbd"), qargs...), "]")
				if q := runOutput(t, "nbdinfo", nargs...); !bytes.Equal(got, q) {
					t.Errorf("%s differs from nbdinfo %q:\n%s\nwant:\n%s", file, nargs, got, q)
				}
				names++
			}
		}
	}
	if names < 10 {
		t.Errorf("only %d map files compared with qemu-nbd", names)
	}
}

func sortedCopy(s []string) []string {
	c := append([]string(nil), s...)
	for i := range c {
		for j := i + 1; j < len(c); j++ {
			if c[j] < c[i] {
				c[i], c[j] = c[j], c[i]
			}
		}
	}
	return c
}

// fuseMapFile is the maps/ file name of a context (DESIGN.md).
func fuseMapFile(name string) string {
	switch {
	case name == metactx.BaseAllocation:
		return "base-allocation"
	case strings.HasPrefix(name, metactx.DirtyBitmapPrefix):
		return "dirty-bitmap-" + strings.TrimPrefix(name, metactx.DirtyBitmapPrefix)
	}
	return strings.TrimPrefix(name, "qemu:")
}

// fuseDataRanges lists the data ranges of a file by SEEK_DATA/SEEK_HOLE.
func fuseDataRanges(t *testing.T, path string) [][2]int64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	var out [][2]int64
	for off := int64(0); off < fi.Size(); {
		d, err := f.Seek(off, 3) // SEEK_DATA
		if errors.Is(err, syscall.ENXIO) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		h, err := f.Seek(d, 4) // SEEK_HOLE
		if err != nil {
			t.Fatal(err)
		}
		if h <= d || len(out) > 1<<20 {
			t.Fatalf("%s: SEEK_HOLE from %d gave %d", path, d, h)
		}
		out = append(out, [2]int64{d, h})
		off = h
	}
	return out
}

func fuseSparseCopy(t *testing.T, dir, top, raw string) {
	img, err := qcow2.Open(top, qcow2.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	var want [][2]int64
	if err := metactx.Walk(img, metactx.BaseAllocation, 0, img.Size(), func(off, n int64, flags uint32) error {
		if flags&metactx.StateHole == 0 {
			want = append(want, [2]int64{off, off + n})
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	disk := filepath.Join(dir, "disk")
	if got := fuseDataRanges(t, disk); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("SEEK_DATA/SEEK_HOLE on disk: %v, block status data: %v", got, want)
	}
	var fi syscall.Stat_t
	if err := syscall.Stat(disk, &fi); err != nil {
		t.Fatal(err)
	}
	var data int64
	for _, r := range want {
		data += r[1] - r[0]
	}
	if fi.Blocks != (data+511)/512 {
		t.Errorf("st_blocks %d, block status has %d data bytes", fi.Blocks, data)
	}
	for _, mode := range []string{"--sparse=always", "--sparse=auto"} {
		out := filepath.Join(t.TempDir(), "copy.raw")
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		cmd := exec.CommandContext(ctx, "cp", mode, disk, out)
		b, err := cmd.CombinedOutput()
		cancel()
		if err != nil {
			t.Fatalf("cp %s: %v\n%s", mode, err, b)
		}
		if fuseSHA(t, out) != fuseSHA(t, raw) {
			t.Errorf("cp %s: copy differs from qemu-img convert", mode)
		}
		if mode != "--sparse=always" {
			continue
		}
		if got := fuseDataRanges(t, out); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("cp %s: copy has data at %v, block status at %v", mode, got, want)
		}
	}
}

// fuseReadOnly checks that nothing under the mount opens for writing and
// that the nbdgw process holds every chain file read-only.
func fuseReadOnly(t *testing.T, m *fuseMount, chain []string) {
	for _, p := range []string{"disk", "info.json", "maps/base-allocation", "layers/1/disk"} {
		f, err := os.OpenFile(filepath.Join(m.dir, p), os.O_RDWR, 0)
		if err == nil {
			f.Close()
			t.Errorf("%s opened read-write", p)
		} else if !errors.Is(err, syscall.EROFS) && !errors.Is(err, syscall.EACCES) {
			t.Errorf("open %s O_RDWR: %v, want EROFS or EACCES", p, err)
		}
	}
	if err := os.WriteFile(filepath.Join(m.dir, "new"), nil, 0o644); !errors.Is(err, syscall.EROFS) {
		t.Errorf("creating a file: %v, want EROFS", err)
	}
	if err := os.Truncate(filepath.Join(m.dir, "disk"), 0); !errors.Is(err, syscall.EROFS) {
		t.Errorf("truncating disk: %v, want EROFS", err)
	}
	pid := m.cmd.Process.Pid
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, fd := range fds {
		target, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
		if err != nil {
			continue
		}
		for _, c := range chain {
			if target != c {
				continue
			}
			seen[c] = true
			info, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%s", pid, fd.Name()))
			if err != nil {
				t.Fatal(err)
			}
			for _, line := range strings.Split(string(info), "\n") {
				if v, ok := strings.CutPrefix(line, "flags:"); ok {
					flags, err := strconv.ParseUint(strings.TrimSpace(v), 8, 32)
					if err != nil {
						t.Fatal(err)
					}
					if flags&syscall.O_ACCMODE != syscall.O_RDONLY {
						t.Errorf("nbdgw holds %s with flags %o: not read-only", c, flags)
					}
				}
			}
		}
	}
	for _, c := range chain {
		if !seen[c] {
			t.Errorf("nbdgw holds no descriptor of %s (fds checked: %d)", c, len(fds))
		}
	}
}

// fusePartitionExt4 builds an MBR disk whose first partition holds an
// ext4 file system with a file in it, converts it to qcow2, mounts it, and
// loop-mounts partitions/p1 from this process (never from the FUSE
// server's own process, which would deadlock).
func fusePartitionExt4(t *testing.T, bin string) {
	fuseRequire(t, "sfdisk", "mkfs.ext4", "mount", "umount")
	if os.Geteuid() != 0 {
		t.Skip("loop-mounting needs root")
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	if err := os.MkdirAll(filepath.Join(src, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	content := bytes.Repeat([]byte("nbdgw partition test\n"), 5000)
	if err := os.WriteFile(filepath.Join(src, "etc", "hello.txt"), content, 0o644); err != nil {
		t.Fatal(err)
	}
	raw := filepath.Join(dir, "guest.raw")
	runOutput(t, "qemu-img", "create", "-q", "-f", "raw", raw, "64M")
	cmd := exec.Command("sfdisk", "-q", "--no-reread", "--no-tell-kernel", raw)
	cmd.Stdin = strings.NewReader("label: dos\nstart=2048,size=40960,type=83\n,,83\n")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("sfdisk: %v\n%s", err, out)
	}
	// mke2fs writes at an offset into the image file: no loop device
	// needed to build it.
	runOutput(t, "mkfs.ext4", "-q", "-F", "-E", "offset=1048576", "-d", src, raw, "20M")
	qc := filepath.Join(dir, "guest.qcow2")
	runOutput(t, "qemu-img", "convert", "-O", "qcow2", raw, qc)

	m := fuseStart(t, bin, qc)
	p1 := filepath.Join(m.dir, "partitions", "p1")
	part := fuseReadFile(t, p1)
	whole := fuseReadFile(t, raw)
	if !bytes.Equal(part, whole[1<<20:1<<20+40960*512]) {
		t.Errorf("partitions/p1 is not bytes [1MiB, 21MiB) of the disk (%d bytes)", len(part))
	}
	// SEEK_DATA/SEEK_HOLE of the partition are block status shifted by
	// its start.
	img, err := qcow2.Open(qc, qcow2.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	var want [][2]int64
	const pStart, pLen = 1 << 20, 40960 * 512
	if err := metactx.Walk(img, metactx.BaseAllocation, pStart, pLen, func(off, n int64, flags uint32) error {
		if flags&metactx.StateHole == 0 {
			want = append(want, [2]int64{off - pStart, off - pStart + n})
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if got := fuseDataRanges(t, p1); fmt.Sprint(got) != fmt.Sprint(want) || len(want) == 0 {
		t.Errorf("SEEK_DATA/SEEK_HOLE on p1: %v, block status: %v", got, want)
	}
	if _, err := os.Stat(filepath.Join(m.dir, "partitions", "p2")); err != nil {
		t.Errorf("partitions/p2: %v", err)
	}
	mnt := filepath.Join(dir, "ext4")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-o", "ro,loop", "-t", "ext4", p1, mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount -o ro,loop of partitions/p1: %v\n%s", err, out)
	}
	defer func() {
		if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
			t.Errorf("umount: %v\n%s", err, out)
		}
	}()
	if got := fuseReadFile(t, filepath.Join(mnt, "etc", "hello.txt")); !bytes.Equal(got, content) {
		t.Errorf("hello.txt through the loop mount: %d bytes, want %d", len(got), len(content))
	}
}

// fuseLifecycle: SIGTERM and fusermount3 -u both end the server cleanly;
// after a kill -9 the stale mount is refused with a clear message, and
// after fusermount3 -u a new mount works.
func fuseLifecycle(t *testing.T, bin, top string) {
	m := fuseStart(t, bin, top)
	m.cmd.Process.Signal(syscall.SIGTERM)
	if err := m.wait(t); err != nil || fuseMounted(t, m.dir) {
		t.Errorf("after SIGTERM: %v, mounted %v\n%s", err, fuseMounted(t, m.dir), m.stderr)
	}

	// Unmounting as soon as the mount appears must work every time:
	// nbdgw must not be busy in its own mount then (it stat()ed it to
	// set readahead, and fusermount3 -u failed with EBUSY 6 of 40 times).
	for i := range 20 {
		m = fuseStart(t, bin, top)
		if out, err := exec.Command("fusermount3", "-u", m.dir).CombinedOutput(); err != nil {
			t.Fatalf("try %d: fusermount3 -u right after the mount appeared: %v\n%s", i, err, out)
		}
		if err := m.wait(t); err != nil {
			t.Errorf("after fusermount3 -u: %v\n%s", err, m.stderr)
		}
	}

	m = fuseStart(t, bin, top)
	m.cmd.Process.Kill()
	m.wait(t)
	out, err := exec.Command(bin, "mount", top, m.dir).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "fusermount3 -u") {
		t.Errorf("mount over a dead mount: %v, %q; want a failure that says to run fusermount3 -u", err, out)
	}
	runOutput(t, "fusermount3", "-u", m.dir)
	m2 := fuseStartAt(t, bin, top, m.dir)
	if _, err := os.Stat(filepath.Join(m2.dir, "disk")); err != nil {
		t.Errorf("new mount after fusermount3 -u: %v", err)
	}
}

func fuseBadInput(t *testing.T, bin, top string) {
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty")
	full := filepath.Join(dir, "full")
	garbage := filepath.Join(dir, "garbage.qcow2")
	for _, d := range []string{empty, full} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(full, "x"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	// A qcow2 magic with a nonsense header.
	if err := os.WriteFile(garbage, append([]byte("QFI\xfb\x00\x00\x00\x03"), bytes.Repeat([]byte{0xff}, 504)...), 0o644); err != nil {
		t.Fatal(err)
	}
	// Internal snapshots: readable, but the engine refuses to write.
	snap := filepath.Join(dir, "snap.qcow2")
	runOutput(t, "qemu-img", "create", "-q", "-f", "qcow2", snap, "1M")
	runOutput(t, "qemu-img", "snapshot", "-c", "s1", snap)
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"missing-mountpoint", []string{top, filepath.Join(dir, "nope")}, "does not exist"},
		{"non-empty-mountpoint", []string{top, full}, "not empty"},
		{"missing-image", []string{filepath.Join(dir, "nope.qcow2"), empty}, "no such file"},
		{"bad-image", []string{garbage, empty}, "garbage.qcow2"},
		{"writable-snapshots", []string{"--writable", snap, empty}, "snapshots"},
		{"writable-no-backing", []string{"--writable", "--no-backing", top, empty}, "has a backing file"},
		{"usage", []string{top}, "missing MOUNTPOINT"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			out, err := exec.CommandContext(ctx, bin, append([]string{"mount"}, tc.args...)...).CombinedOutput()
			if err == nil {
				t.Errorf("nbdgw mount %q succeeded", tc.args)
			}
			if !strings.Contains(strings.ToLower(string(out)), strings.ToLower(tc.want)) {
				t.Errorf("nbdgw mount %q said %q, want it to mention %q", tc.args, out, tc.want)
			}
			for _, d := range []string{empty, full} {
				if fuseMounted(t, d) {
					exec.Command("fusermount3", "-u", d).Run()
					t.Errorf("%s left mounted", d)
				}
			}
		})
	}
}

// fuseManyExtents maps an image of 131072 extents (512-byte clusters,
// every other one allocated) through the mount: cat of the map files
// equals nbdgw map --context and nbdinfo over qemu-nbd, in one pass and
// read back from the start.
func fuseManyExtents(t *testing.T, bin, work string) {
	raw := filepath.Join(work, "striped.raw")
	f, err := os.Create(raw)
	if err != nil {
		t.Fatal(err)
	}
	const size = 64 << 20
	buf := make([]byte, size)
	for off := 0; off < size; off += 1024 {
		for i := off; i < off+512; i++ {
			buf[i] = 0x5a
		}
	}
	if _, err := f.Write(buf); err != nil {
		t.Fatal(err)
	}
	f.Close()
	qc := filepath.Join(work, "striped.qcow2")
	runOutput(t, "qemu-img", "convert", "-S", "512", "-O", "qcow2", "-o", "cluster_size=512", raw, qc)
	m := fuseStart(t, bin, qc)
	for _, ctx := range []string{metactx.BaseAllocation, metactx.AllocationDepth} {
		file := filepath.Join(m.dir, "maps", fuseMapFile(ctx))
		out, err := exec.Command("cat", file).Output()
		if err != nil {
			t.Fatal(err)
		}
		if lines := bytes.Count(out, []byte("\n")); lines != size/512 {
			t.Errorf("%s: %d lines, want %d", file, lines, size/512)
		}
		if cli := runOutput(t, bin, "map", "--context", ctx, qc); !bytes.Equal(out, cli) {
			t.Errorf("%s (%d bytes) differs from nbdgw map --context (%d bytes)", file, len(out), len(cli))
		}
		if q := runOutput(t, "nbdinfo", "--map="+ctx, "--", "[", "qemu-nbd", "-r", "-A", "-f", "qcow2", qc, "]"); !bytes.Equal(out, q) {
			t.Errorf("%s (%d bytes) differs from nbdinfo over qemu-nbd (%d bytes)", file, len(out), len(q))
		}
		// One open file read twice from offset 0.
		g, err := os.Open(file)
		if err != nil {
			t.Fatal(err)
		}
		for pass := range 2 {
			if _, err := g.Seek(0, io.SeekStart); err != nil {
				t.Fatal(err)
			}
			again, err := io.ReadAll(g)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(again, out) {
				t.Errorf("%s pass %d: re-read differs", file, pass)
			}
		}
		g.Close()
	}
}

// fuseCorrupt points one L2 entry of a qcow2 past the end of the file.
// The mount must still come up with the right size (stat must not fail:
// lookups need it), the intact cluster must read back, and the broken one
// must read as QEMU reads it (zeros: file-posix pads past EOF) or fail
// with EIO, never return other bytes.
func fuseCorrupt(t *testing.T, bin string) {
	dir := t.TempDir()
	qc := filepath.Join(dir, "corrupt.qcow2")
	runOutput(t, "qemu-img", "create", "-q", "-f", "qcow2", qc, "64M")
	runOutput(t, "qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64k", "-c", "write -P 2 32M 64k", qc)
	f, err := os.OpenFile(qc, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	be := func(off int64) uint64 {
		var b [8]byte
		if _, err := f.ReadAt(b[:], off); err != nil {
			t.Fatal(err)
		}
		return uint64(b[0])<<56 | uint64(b[1])<<48 | uint64(b[2])<<40 | uint64(b[3])<<32 |
			uint64(b[4])<<24 | uint64(b[5])<<16 | uint64(b[6])<<8 | uint64(b[7])
	}
	l1 := int64(be(40))
	l2 := int64(be(l1) & 0x00fffffffffffe00)
	entry := l2 + 8*(32<<20)/65536
	if be(entry)&0x00fffffffffffe00 == 0 {
		t.Fatalf("no L2 entry for 32M at %#x", entry)
	}
	bad := []byte{0x80, 0, 1, 0, 0, 0, 0, 0} // copied, 1 TiB: past the end
	if _, err := f.WriteAt(bad, entry); err != nil {
		t.Fatal(err)
	}
	f.Close()

	m := fuseStart(t, bin, qc)
	disk := filepath.Join(m.dir, "disk")
	fi, err := os.Stat(disk)
	if err != nil || fi.Size() != 64<<20 {
		t.Fatalf("stat of disk over a corrupt image: %v, %v", fi, err)
	}
	g, err := os.Open(disk)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	buf := make([]byte, 64<<10)
	if _, err := g.ReadAt(buf, 0); err != nil || !bytes.Equal(buf, bytes.Repeat([]byte{1}, len(buf))) {
		t.Errorf("intact cluster: %v", err)
	}
	_, err = g.ReadAt(buf, 32<<20)
	if err == nil && !bytes.Equal(buf, make([]byte, len(buf))) {
		t.Errorf("broken cluster read without error but not as zeros")
	} else if err != nil && !errors.Is(err, syscall.EIO) {
		t.Errorf("broken cluster: %v, want EIO or QEMU's zeros", err)
	}
	if _, err := g.ReadAt(buf, 0); err != nil {
		t.Errorf("mount unusable after the bad read: %v", err)
	}
}
