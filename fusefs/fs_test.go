package fusefs

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"

	"github.com/nbdgw/nbdgw/internal/metactx"
	"github.com/nbdgw/nbdgw/qcow2"
)

// TestMountInProcess mounts a chain in the test process (so that the race
// detector sees the server) and reads the disk and every map file from
// several goroutines at once. Plain reads of our own mount from other
// goroutines are fine; only a loop mount from this process would deadlock.
func TestMountInProcess(t *testing.T) {
	requireMount(t)
	dir := t.TempDir()
	base, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "16M")
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 1 0 2M", "-c", "write -c -P 2 4M 256k", base)
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
	run(t, "qemu-img", "bitmap", "--add", top, "b0")
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 3 1M 1M", "-c", "write -z 5M 1M", "-c", "write -P 4 15M 64k", top)
	raw := filepath.Join(dir, "top.raw")
	run(t, "qemu-img", "convert", "-O", "raw", top, raw)
	want, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}

	img, err := qcow2.Open(top, qcow2.Options{})
	if err != nil {
		t.Fatal(err)
	}
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	var logMu sync.Mutex // guards logged
	var logged []string
	srv, err := Mount(mnt, img, Config{Name: top, Logf: func(format string, args ...any) {
		logMu.Lock()
		defer logMu.Unlock()
		logged = append(logged, fmt.Sprintf(format, args...))
	}})
	if err != nil {
		img.Close()
		t.Fatal(err)
	}
	// The image outlives the server: Wait returns once every request
	// handler has.
	t.Cleanup(func() {
		if err := srv.Unmount(); err != nil {
			t.Errorf("Unmount: %v", err)
		}
		srv.Wait()
		img.Close()
	})

	maps := map[string][]byte{}
	for _, name := range metactx.Names(img) {
		for _, json := range []bool{false, true} {
			var b bytes.Buffer
			if err := metactx.WriteMap(&b, img, name, json); err != nil {
				t.Fatal(err)
			}
			fn, _ := mapFileName(name, json)
			maps[fn] = b.Bytes()
		}
	}
	if _, ok := maps["dirty-bitmap-b0"]; !ok {
		t.Fatalf("no dirty bitmap context: %v", metactx.Names(img))
	}
	var wg sync.WaitGroup
	for g := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got, err := os.ReadFile(filepath.Join(mnt, "disk"))
			if err != nil || !bytes.Equal(got, want) {
				t.Errorf("goroutine %d: disk differs from qemu-img convert (%v)", g, err)
			}
			for fn, w := range maps {
				got, err := os.ReadFile(filepath.Join(mnt, "maps", fn))
				if err != nil || !bytes.Equal(got, w) {
					t.Errorf("goroutine %d: maps/%s differs from metactx.WriteMap (%v):\n%s", g, fn, err, got)
				}
			}
		}()
	}
	wg.Wait()

	f, err := os.Open(filepath.Join(mnt, "disk"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// qemu-img convert writes the raw copy sparsely (holes where the
	// image reads zeros without data): SEEK_DATA/SEEK_HOLE on disk must
	// agree with the host file system's answers on that copy, ENXIO
	// included.
	rf, err := os.Open(raw)
	if err != nil {
		t.Fatal(err)
	}
	defer rf.Close()
	holes := 0
	for off := int64(0); off <= int64(len(want)); off += 64 << 10 {
		for _, whence := range []int{seekData, seekHole} {
			got, gerr := f.Seek(off, whence)
			exp, eerr := rf.Seek(off, whence)
			if got != exp || !errors.Is(gerr, errnoOf(eerr)) {
				t.Errorf("Seek(%d, %d) = %d, %v; the raw copy says %d, %v", off, whence, got, gerr, exp, eerr)
			}
			if whence == seekHole && gerr == nil && got == off {
				holes++
			}
		}
	}
	if holes == 0 {
		t.Errorf("the raw copy has no holes: the seek comparison proves nothing")
	}
	if _, err := os.OpenFile(filepath.Join(mnt, "disk"), os.O_WRONLY, 0); !errors.Is(err, syscall.EROFS) {
		t.Errorf("open for writing: %v, want EROFS", err)
	}
	logMu.Lock()
	defer logMu.Unlock()
	if len(logged) > 0 {
		t.Errorf("errors logged: %q", logged)
	}
}

// errnoOf is the errno inside err, or nil.
func errnoOf(err error) error {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return errno
	}
	return nil
}

// requireMount skips a test that mounts in-process where /dev/fuse or the
// tools it needs are missing.
func requireMount(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skipf("no /dev/fuse: %v", err)
	}
	for _, tool := range []string{"fusermount3", "qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed: %v", tool, err)
		}
	}
}
