package fusefs

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"

	"github.com/nbdgw/nbdgw/qcow2"
	"golang.org/x/sys/unix"
)

// TestMountWritableInProcess mounts a writable chain in the test process
// (so that the race detector sees the server) and writes, punches holes
// and fsyncs from several goroutines at once, each in its own region,
// while others read disk, layers/1/disk and the maps and stat and seek.
// Then disk, qemu-img convert and qemu-img check must agree with what was
// written.
func TestMountWritableInProcess(t *testing.T) {
	requireMount(t)
	dir := t.TempDir()
	base, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "16M")
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 1 0 6M", "-c", "write -c -P 2 8M 1M", base)
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 3 1M 1M", "-c", "write -z 5M 1M", top)
	raw := filepath.Join(dir, "top.raw")
	run(t, "qemu-img", "convert", "-O", "raw", top, raw)
	shadow, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}

	img, err := qcow2.Open(top, qcow2.Options{Writable: true})
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
	unmounted := false
	t.Cleanup(func() {
		if !unmounted {
			srv.Unmount()
			srv.Wait()
			img.Close()
		}
	})
	disk := filepath.Join(mnt, "disk")

	const writers, region = 4, 4 << 20
	stop := make(chan struct{})
	var readers, wg sync.WaitGroup
	for g := range 2 {
		readers.Add(1)
		go func() {
			defer readers.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				for _, p := range []string{"disk", "layers/1/disk", "maps/base-allocation", "maps/allocation-depth.json"} {
					if _, err := os.ReadFile(filepath.Join(mnt, p)); err != nil {
						t.Errorf("reader %d: %s: %v", g, p, err)
						return
					}
				}
				var st syscall.Stat_t
				if err := syscall.Stat(disk, &st); err != nil {
					t.Errorf("reader %d: stat: %v", g, err)
				}
				f, err := os.Open(disk)
				if err != nil {
					t.Errorf("reader %d: %v", g, err)
					return
				}
				f.Seek(int64(i%16)<<20, seekData)
				f.Close()
			}
		}()
	}
	for g := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			f, err := os.OpenFile(disk, os.O_RDWR, 0)
			if err != nil {
				t.Error(err)
				return
			}
			defer f.Close()
			rng := rand.New(rand.NewPCG(uint64(g), 7))
			lo := int64(g) * region
			buf := make([]byte, 512<<10)
			for range 60 {
				n := 1 + rng.Int64N(int64(len(buf)))
				off := lo + rng.Int64N(region-n+1)
				switch r := rng.IntN(10); {
				case r < 7:
					for i := range buf[:n] {
						buf[i] = byte(rng.Uint32())
					}
					if _, err := f.WriteAt(buf[:n], off); err != nil {
						t.Errorf("writer %d: pwrite %d at %d: %v", g, n, off, err)
						return
					}
					copy(shadow[off:], buf[:n])
				case r < 9:
					mode := uint32(unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE)
					if r == 8 {
						mode = unix.FALLOC_FL_ZERO_RANGE
					}
					if err := unix.Fallocate(int(f.Fd()), mode, off, n); err != nil {
						t.Errorf("writer %d: fallocate %#x %d at %d: %v", g, mode, n, off, err)
						return
					}
					clear(shadow[off : off+n])
				default:
					if err := f.Sync(); err != nil {
						t.Errorf("writer %d: fsync: %v", g, err)
					}
				}
			}
		}()
	}
	wg.Wait()
	close(stop)
	readers.Wait()

	got, err := os.ReadFile(disk)
	if err != nil || !bytes.Equal(got, shadow) {
		t.Errorf("disk after the writes differs from the shadow (%v)", err)
	}
	if err := srv.Unmount(); err != nil {
		t.Fatalf("Unmount: %v", err)
	}
	srv.Wait()
	unmounted = true
	if err := img.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	run(t, "qemu-img", "convert", "-O", "raw", top, raw)
	if got, err := os.ReadFile(raw); err != nil || !bytes.Equal(got, shadow) {
		t.Errorf("qemu-img convert after unmount differs from the shadow (%v)", err)
	}
	if out, err := exec.Command("qemu-img", "check", top).CombinedOutput(); err != nil {
		t.Errorf("qemu-img check: %v\n%s", err, out)
	}
	logMu.Lock()
	defer logMu.Unlock()
	if len(logged) > 0 {
		t.Errorf("errors logged: %q", logged)
	}
}
