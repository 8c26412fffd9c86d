package integration

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"
	"time"
)

// vmRepoRoot finds the directory holding go.mod above the test's directory.
func vmRepoRoot(t *testing.T) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("go.mod not found above the test directory")
		}
		dir = parent
	}
}

// TestVM runs scripts/vmtest.sh: nbdgw attach/detach/list against the nbd
// driver of Debian's cloud kernel booted under qemu-system-x86_64, read-only
// and --writable (mkfs.ext4 and files on a qcow2 overlay, 1 and 2
// connections). The guest prints "ok"/"not ok" lines and NBDGW-VMTEST: PASS
// or FAIL; the host then checks the written overlay (qemu-img check, the
// base unchanged, the files through nbdgw mount + a loop mount) and prints
// "ok - host: ..." lines.
func TestVM(t *testing.T) {
	if runtime.GOOS != "linux" || runtime.GOARCH != "amd64" {
		t.Skipf("the VM test boots an amd64 Debian kernel; this is %s/%s", runtime.GOOS, runtime.GOARCH)
	}
	if testing.Short() {
		t.Skip("-short: the VM test boots a kernel (about 50s)")
	}
	// The tools the script needs, by Debian package.
	tools := []struct{ cmd, pkg string }{
		{"qemu-system-x86_64", "qemu-system-x86"},
		{"qemu-img", "qemu-utils"},
		{"busybox", "busybox-static"},
		{"cpio", "cpio"},
		{"depmod", "kmod"},
		{"mkfs.ext4", "e2fsprogs"},
		{"mke2fs", "e2fsprogs"}, // copied into the guest with its libraries
		{"ldd", "libc-bin"},
		{"debugfs", "e2fsprogs"},
		{"dpkg-deb", "dpkg"},
		{"apt-get", "apt"},
	}
	var missing []string
	for _, tool := range tools {
		if _, err := exec.LookPath(tool.cmd); err != nil {
			if _, err := os.Stat(filepath.Join("/usr/sbin", tool.cmd)); err == nil {
				continue
			}
			missing = append(missing, tool.cmd+" ("+tool.pkg+")")
		}
	}
	if len(missing) > 0 {
		t.Skipf("the VM test needs: %s", strings.Join(missing, ", "))
	}

	timeout := 5 * time.Minute
	if d, ok := t.Deadline(); ok && time.Until(d)-10*time.Second < timeout {
		timeout = time.Until(d) - 10*time.Second
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	root := vmRepoRoot(t)
	cmd := exec.CommandContext(ctx, "bash", filepath.Join(root, "scripts", "vmtest.sh"))
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "NBDGW_VM_NO_INSTALL=1")
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	start := time.Now()
	err := cmd.Run()
	console := out.String()

	// Report the guest's checks and timings either way.
	keep := regexp.MustCompile(`^(ok|not ok) - |^vmtest|NBDGW-VMTEST`)
	for _, line := range strings.Split(console, "\n") {
		if keep.MatchString(line) {
			t.Log(line)
		}
	}
	t.Logf("vmtest.sh took %v", time.Since(start).Round(time.Second))
	if err != nil || !strings.Contains(console, "\nNBDGW-VMTEST: PASS") || strings.Contains(console, "\nnot ok - ") {
		t.Logf("full output:\n%s", console)
		t.Fatalf("vmtest.sh: %v; the guest did not report PASS", err)
	}
}

// TestAttachWithoutNBD runs nbdgw attach on a host kernel without any nbd
// driver (as on the development machine): it must fail and say so.
func TestAttachWithoutNBD(t *testing.T) {
	if _, err := os.Stat("/sys/module/nbd"); err == nil {
		t.Skip("the host kernel has the nbd driver loaded")
	}
	b, err := os.ReadFile("/proc/sys/kernel/osrelease")
	if err != nil {
		t.Skipf("kernel release: %v", err)
	}
	release := strings.TrimSpace(string(b))
	if mods, _ := filepath.Glob(filepath.Join("/lib/modules", release, "kernel/drivers/block/nbd.ko*")); len(mods) > 0 {
		t.Skipf("the host kernel has a loadable nbd module (%s); the VM test covers attach", mods[0])
	}
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img not installed")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "nbdgw")
	build := exec.Command("go", "build", "-o", bin, "./cmd/nbdgw")
	build.Dir = vmRepoRoot(t)
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	img := filepath.Join(dir, "disk.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", img, "1M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img: %v\n%s", err, out)
	}
	for _, args := range [][]string{
		{"attach", img},
		{"attach", "--connections", "2", "--device", "/dev/nbd1", img},
	} {
		cmd := exec.Command(bin, args...)
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 1 {
			t.Fatalf("nbdgw %v: %v, want exit status 1; stderr %q", args, err, stderr.String())
		}
		msg := stderr.String()
		if !strings.Contains(msg, "no nbd support") || !strings.Contains(msg, release) {
			t.Errorf("nbdgw %v: %q does not say that kernel %s has no nbd support", args, msg, release)
		}
		if stdout.Len() != 0 {
			t.Errorf("nbdgw %v printed %q on stdout", args, stdout.String())
		}
		t.Logf("nbdgw %v: %s", args, strings.TrimSpace(msg))
	}
}
