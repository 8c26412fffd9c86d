package qcow2

import (
	"bytes"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// nbdMap is what qemu-nbd exports for context ctx of image f, via nbdinfo.
func nbdMap(t *testing.T, d, f, ctx string, bitmaps ...string) string {
	t.Helper()
	sock := filepath.Join(d, fmt.Sprintf("q%d.sock", time.Now().UnixNano()))
	args := []string{"-r", "-t", "-k", sock}
	for _, b := range bitmaps {
		args = append(args, "-B", b)
	}
	srv := exec.Command("qemu-nbd", append(args, f)...)
	var errb bytes.Buffer
	srv.Stderr = &errb
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { srv.Process.Kill(); srv.Wait() }()
	for i := 0; ; i++ {
		if c, err := net.Dial("unix", sock); err == nil { // listening, not merely bound
			c.Close()
			break
		}
		if i > 300 {
			t.Fatalf("qemu-nbd: %s", errb.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	out, err := exec.Command("nbdinfo", "--map="+ctx, "nbd+unix:///?socket="+sock).CombinedOutput()
	if err != nil {
		t.Fatalf("nbdinfo: %v\n%s", err, out)
	}
	return string(out)
}

// TestBitmapsTrackWrites: enabled persistent bitmaps record writes exactly
// as QEMU records the same writes, disabled ones do not change, in_use is
// cleared at close and qemu-img check is clean.
func TestBitmapsTrackWrites(t *testing.T) {
	for _, tool := range []string{"qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed", tool)
		}
	}
	d := t.TempDir()
	ours, theirs := filepath.Join(d, "ours.qcow2"), filepath.Join(d, "theirs.qcow2")
	mustRun(t, d, "qemu-img", "create", "-f", "qcow2", ours, "16M")
	mustRun(t, d, "qemu-img", "bitmap", "--add", ours, "on")
	mustRun(t, d, "qemu-img", "bitmap", "--add", "-g", "256k", ours, "coarse")
	mustRun(t, d, "qemu-img", "bitmap", "--add", ours, "off")
	mustRun(t, d, "qemu-io", "-f", "qcow2", "-c", "w -P 1 1M 64k", "-c", "w -P 2 9M 4k", ours)
	mustRun(t, d, "qemu-img", "bitmap", "--disable", ours, "off")
	mustRun(t, d, "cp", ours, theirs)

	ops := []struct {
		kind    string
		off, n  int64
		qemuCmd string
	}{
		{"write", 0, 4096, "w -P 5 0 4k"},
		{"write", 3<<20 + 100, 200000, "w -P 6 3145828 200000"},
		{"zero", 12 << 20, 128 << 10, "w -z 12M 128k"},
		{"discard", 14 << 20, 1 << 20, "discard 14M 1M"},
		{"write", 16<<20 - 512, 512, "w -P 7 16776704 512"},
	}
	im, err := Open(ours, Options{Writable: true, Warn: func(s string) { t.Log(s) }})
	if err != nil {
		t.Fatal(err)
	}
	info, _ := exec.Command("qemu-img", "info", "-U", ours).CombinedOutput()
	if !strings.Contains(string(info), "in-use") {
		t.Errorf("bitmaps not marked in use while open:\n%s", info)
	}
	var qemuArgs []string
	for _, o := range ops {
		switch o.kind {
		case "write":
			_, err = im.WriteAt(bytes.Repeat([]byte{9}, int(o.n)), o.off)
		case "zero":
			err = im.WriteZeroes(o.off, o.n, ZeroMayUnmap)
		case "discard":
			err = im.Discard(o.off, o.n)
		}
		if err != nil {
			t.Fatalf("%s: %v", o.kind, err)
		}
		qemuArgs = append(qemuArgs, "-c", o.qemuCmd)
	}
	// Bitmaps read while open come from memory.
	var dirty int64
	im.BitmapStatus("on", 0, im.Size(), func(_, n int64, d bool) error {
		if d {
			dirty += n
		}
		return nil
	})
	if dirty == 0 {
		t.Errorf("no dirty bits visible while open")
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	mustRun(t, d, "qemu-io", append(append([]string{"-f", "qcow2"}, qemuArgs...), theirs)...)
	mustRun(t, d, "qemu-img", "check", ours)
	info, _ = exec.Command("qemu-img", "info", ours).CombinedOutput()
	if strings.Contains(string(info), "in-use") {
		t.Errorf("in_use left set after close:\n%s", info)
	}
	for _, b := range []string{"on", "coarse", "off"} {
		want := nbdMap(t, d, theirs, "qemu:dirty-bitmap:"+b, b)
		got := nbdMap(t, d, ours, "qemu:dirty-bitmap:"+b, b)
		if got != want {
			t.Errorf("bitmap %s after writes differs from QEMU's\n--- qemu-io:\n%s--- nbdgw:\n%s", b, want, got)
		}
	}
}
