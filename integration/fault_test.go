package integration

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nbdgw/nbdgw/internal/faultfs"
	"github.com/nbdgw/nbdgw/nbdserver/nbdclient"
	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
)

// The storage fails under a running nbdgw: the image lives on a faultfs
// mount that this test process serves, nbdgw (a child process) writes it.
// After the first failed write or fsync every later flush fails, also once
// the storage works again, and what is on disk afterwards checks clean (or
// with leaks only) and holds every byte a successful flush acknowledged.

// faultImage makes a 4 MiB qcow2 image in a fresh backing directory and
// returns the faultfs mount over it.
func faultImage(t *testing.T) *faultfs.FS {
	t.Helper()
	back := t.TempDir()
	runOutput(t, "qemu-img", "create", "-q", "-f", "qcow2", filepath.Join(back, "f.qcow2"), "4M")
	return faultfs.New(t, back)
}

// faultVerify checks the image in the backing directory with qemu-img
// check (exit 0 or 3) and that the guest bytes [off, off+len(want)) are
// want.
func faultVerify(t *testing.T, ffs *faultfs.FS, off int64, want []byte) int {
	t.Helper()
	img := filepath.Join(ffs.Backing(), "f.qcow2")
	code, out := nbdQemuCheck(img)
	if code != 0 && code != 3 {
		t.Fatalf("qemu-img check exit %d:\n%s", code, out)
	}
	raw := filepath.Join(t.TempDir(), "out.raw")
	runOutput(t, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", img, raw)
	got, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[off:off+int64(len(want))], want) {
		t.Fatalf("flushed data at %d lost after the failure", off)
	}
	return code
}

// faultStopServe stops nbdgw serve with SIGTERM: closing the failed image
// fails, so it must exit 1 and say why.
func faultStopServe(t *testing.T, srv *nbdServer) {
	t.Helper()
	srv.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-srv.done:
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(srv.stderr.String(), "first failure") {
			t.Fatalf("nbdgw serve after SIGTERM on a failed image: %v, want exit 1 naming the failure\n%s", err, srv.stderr)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("nbdgw serve did not stop after SIGTERM")
	}
}

func faultErrno(t *testing.T, what string, err error, want nbdproto.Errno) {
	t.Helper()
	var se *nbdproto.ServerError
	if !errors.As(err, &se) || se.Errno != want {
		t.Fatalf("%s: %v, want the server's %v", what, err, want)
	}
}

// TestFaultNBD: `nbdgw serve --writable` on an image whose storage fails
// an fsync and recovers; also a full disk.
func TestFaultNBD(t *testing.T) {
	nbdRequire(t, "qemu-img", "qemu-io")
	bin := nbdgwBinary(t)
	t.Run("fsync", func(t *testing.T) {
		ffs := faultImage(t)
		srv := nbdServe(t, bin, "--writable", "-f", "qcow2", filepath.Join(ffs.Dir(), "f.qcow2"))
		// A real client writes and flushes the data that must survive.
		runOutput(t, "qemu-io", "-f", "raw", "-c", "write -P 0x5a 64k 192k", "-c", "flush", srv.uri())
		c := srv.dial(t, nbdclient.Options{})
		if _, err := c.WriteAt(bytes.Repeat([]byte{0x33}, 128<<10), 1<<20); err != nil {
			t.Fatal(err)
		}
		ffs.Set(faultfs.Fault{Ops: faultfs.Fsync, Errno: syscall.EIO, Count: 1})
		faultErrno(t, "flush during the fault", c.Flush(), nbdproto.EIO)
		ffs.Clear()
		faultErrno(t, "flush after the storage recovered", c.Flush(), nbdproto.EIO)
		faultErrno(t, "write after the failure", func() error { _, err := c.WriteAt([]byte{1}, 0); return err }(), nbdproto.EIO)
		faultErrno(t, "FUA write after the failure", c.WriteFlags(make([]byte, 512), 0, nbdproto.CmdFlagFUA), nbdproto.EIO)
		faultErrno(t, "zero write after the failure", c.WriteZeroes(0, 4096, 0), nbdproto.EIO)
		got := make([]byte, 192<<10)
		if _, err := c.ReadAt(got, 64<<10); err != nil || !bytes.Equal(got, bytes.Repeat([]byte{0x5a}, 192<<10)) {
			t.Fatalf("read after the failure: %v", err)
		}
		// A second, real client sees the same.
		if out, err := exec.Command("qemu-io", "-f", "raw", "-c", "flush", srv.uri()).CombinedOutput(); err == nil && !bytes.Contains(out, []byte("error")) {
			t.Fatalf("qemu-io flush after the failure succeeded:\n%s", out)
		}
		c.Close()
		faultStopServe(t, srv)
		code := faultVerify(t, ffs, 64<<10, bytes.Repeat([]byte{0x5a}, 192<<10))
		t.Logf("after the failed fsync: qemu-img check exit %d", code)
	})
	t.Run("disk-full", func(t *testing.T) {
		ffs := faultImage(t)
		srv := nbdServe(t, bin, "--writable", "-f", "qcow2", filepath.Join(ffs.Dir(), "f.qcow2"))
		c := srv.dial(t, nbdclient.Options{})
		want := bytes.Repeat([]byte{0x77}, 64<<10)
		if _, err := c.WriteAt(want, 0); err != nil {
			t.Fatal(err)
		}
		if err := c.Flush(); err != nil {
			t.Fatal(err)
		}
		ffs.DiskFull(100<<10, syscall.ENOSPC)
		var err error
		for i := int64(1); i < 32 && err == nil; i++ {
			_, err = c.WriteAt(bytes.Repeat([]byte{byte(i)}, 64<<10), i*64<<10)
		}
		faultErrno(t, "write on a full disk", err, nbdproto.ENOSPC)
		ffs.Clear()
		faultErrno(t, "flush after the disk filled", c.Flush(), nbdproto.ENOSPC)
		c.Close()
		faultStopServe(t, srv)
		code := faultVerify(t, ffs, 0, want)
		t.Logf("after the full disk: qemu-img check exit %d", code)
	})
}

// TestFaultFUSE: `nbdgw mount --writable` of an image whose storage fails;
// fsync of the disk fails, and fails again after the storage recovered. On
// a full disk the errno is ENOSPC.
func TestFaultFUSE(t *testing.T) {
	fuseRequire(t)
	bin := nbdgwBinary(t)
	for _, c := range []struct {
		name  string
		errno syscall.Errno
		set   func(*faultfs.FS)
	}{
		{"eio", syscall.EIO, func(f *faultfs.FS) {
			f.Set(faultfs.Fault{Ops: faultfs.Write | faultfs.Fsync, Errno: syscall.EIO})
		}},
		{"disk-full", syscall.ENOSPC, func(f *faultfs.FS) { f.DiskFull(20<<10, syscall.ENOSPC) }},
	} {
		t.Run(c.name, func(t *testing.T) {
			ffs := faultImage(t)
			m := fuseStart(t, bin, filepath.Join(ffs.Dir(), "f.qcow2"), "--writable", "-f", "qcow2")
			disk, err := os.OpenFile(filepath.Join(m.dir, "disk"), os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer disk.Close()
			want := bytes.Repeat([]byte{0x42}, 128<<10)
			if _, err := disk.WriteAt(want, 256<<10); err != nil {
				t.Fatal(err)
			}
			if err := disk.Sync(); err != nil {
				t.Fatal(err)
			}
			c.set(ffs)
			_, werr := disk.WriteAt(bytes.Repeat([]byte{0x43}, 64<<10), 1<<20)
			serr := disk.Sync()
			if !errors.Is(werr, c.errno) && !errors.Is(serr, c.errno) {
				t.Fatalf("write %v and fsync %v on failing storage: want %v", werr, serr, c.errno)
			}
			ffs.Clear()
			if err := disk.Sync(); !errors.Is(err, c.errno) {
				t.Fatalf("fsync after the storage recovered: %v, want %v", err, c.errno)
			}
			if _, err := disk.WriteAt([]byte{1}, 0); !errors.Is(err, c.errno) {
				t.Fatalf("write after the failure: %v, want %v", err, c.errno)
			}
			got := make([]byte, len(want))
			if _, err := disk.ReadAt(got, 256<<10); err != nil || !bytes.Equal(got, want) {
				t.Fatalf("read after the failure: %v", err)
			}
			disk.Close()
			m.cmd.Process.Signal(syscall.SIGINT)
			var ee *exec.ExitError
			if err := m.wait(t); !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(m.stderr.String(), "first failure") {
				t.Fatalf("nbdgw mount after SIGINT on a failed image: %v, want exit 1 naming the failure\n%s", err, m.stderr)
			}
			code := faultVerify(t, ffs, 256<<10, want)
			t.Logf("qemu-img check exit %d", code)
		})
	}
}
