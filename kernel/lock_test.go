package kernel

import (
	"context"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nbdgw/nbdgw/qcow2"
)

// TestAttachHoldsImageLocks: an attached image keeps QEMU's image locks
// for as long as it is open: QEMU's tools are refused with their own lock
// errors while the fake kernel has the device, and may use the image once
// it is detached and closed.
func TestAttachHoldsImageLocks(t *testing.T) {
	path, _ := testImage(t)
	base := filepath.Join(filepath.Dir(path), "base.qcow2")
	qemu := func(args ...string) (string, error) {
		out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
		return string(out), err
	}
	refused := func(want string, args ...string) {
		t.Helper()
		out, err := qemu(args...)
		if err == nil || !strings.Contains(out, want) {
			t.Errorf("%v while attached: %v, %s; want %q", args, err, out, want)
		}
	}
	works := func(args ...string) {
		t.Helper()
		if out, err := qemu(args...); err != nil {
			t.Errorf("%v: %v\n%s", args, err, out)
		}
	}
	for _, writable := range []bool{false, true} {
		img, err := qcow2.Open(path, qcow2.Options{Writable: writable})
		if err != nil {
			t.Fatal(err)
		}
		k := &fakeKernel{t: t, index: 6}
		c := fakeKernelConn(t, k)
		a, err := Attach(context.Background(), c, AttachConfig{Image: img, Name: path, Index: AnyIndex, Writable: writable})
		if err != nil {
			img.Close()
			t.Fatal(err)
		}
		refused(`Failed to get "write" lock`, "qemu-io", "-c", "write 0 64k", path)
		refused(`Failed to get "write" lock`, "qemu-io", "-f", "qcow2", "-c", "write 0 64k", base)
		if writable {
			refused(`Failed to get shared "write" lock`, "qemu-img", "info", path)
		} else {
			works("qemu-img", "info", path)
		}
		stopAndWait(t, a, c, "detach", 6, 20*time.Second)
		if err := img.Close(); err != nil {
			t.Fatal(err)
		}
		works("qemu-io", "-c", "write 0 64k", path)
	}
}
