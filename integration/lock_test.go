package integration

// Image locks on every door (serve, mount, attach, map, info), tested
// against the real QEMU in both directions: QEMU holds the image and nbdgw
// must be refused as QEMU refuses itself; nbdgw holds it and QEMU's tools
// must be refused with their own lock errors.

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// lockFiles makes a chain top.qcow2 over base.qcow2 (with data in both).
// top has a persistent bitmap: a writable open that wrote anything before
// every lock was granted (bitmaps are marked in_use) would change it.
func lockFiles(t *testing.T) (dir, top, base string) {
	t.Helper()
	dir = t.TempDir()
	top, base = filepath.Join(dir, "top.qcow2"), filepath.Join(dir, "base.qcow2")
	runOutput(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "4M")
	runOutput(t, "qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M", base)
	runOutput(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
	runOutput(t, "qemu-io", "-f", "qcow2", "-c", "write -P 2 1M 1M", top)
	runOutput(t, "qemu-img", "bitmap", "--add", top, "b0")
	return dir, top, base
}

// lockKey is how the kernel names a file in /proc/locks.
func lockKey(t *testing.T, path string) string {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%02x:%02x:%d", unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino)
}

// lockLines lists the locks anyone holds on path, from /proc/locks,
// without the leading ordinal: "OFDLCK ADVISORY READ -1 fe:00:123 100 101".
func lockLines(t *testing.T, path string) []string {
	t.Helper()
	key := lockKey(t, path)
	f, err := os.Open("/proc/locks")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []string
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) >= 8 && fields[5] == key && !strings.HasPrefix(fields[1], "->") {
			out = append(out, strings.Join(fields[1:], " "))
		}
	}
	return out
}

// pidLocks is the lock lines process pid holds on path (/proc/PID/fdinfo).
func pidLocks(t *testing.T, pid int, path string) []string {
	t.Helper()
	key := lockKey(t, path)
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fdinfo", pid))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%s", pid, e.Name()))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			if rest, ok := strings.CutPrefix(line, "lock:"); ok {
				if f := strings.Fields(rest); len(f) >= 8 && f[5] == key {
					out = append(out, strings.Join(f[1:], " "))
				}
			}
		}
	}
	return out
}

// waitLocked waits until process pid holds a lock on path and its locks
// there stay the same for a moment (qemu-nbd drops and retakes them around
// the readiness probe's disconnect).
func waitLocked(t *testing.T, pid int, path string) {
	t.Helper()
	prev := ""
	for i := 0; i < 200; i++ {
		cur := strings.Join(pidLocks(t, pid, path), "\n")
		if cur != "" && cur == prev {
			return
		}
		prev = cur
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("pid %d took no stable lock on %s (%q)", pid, path, prev)
}

// qemuHolder is a QEMU tool keeping an image open.
type qemuHolder struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	err   *lockedBuffer
}

// holdQEMU starts qemu-nbd (persistent, on a socket) or qemu-io (reading
// commands from a pipe) on image and waits until it holds its locks on
// watch.
func holdQEMU(t *testing.T, watch, name string, args ...string) *qemuHolder {
	t.Helper()
	h := &qemuHolder{err: &lockedBuffer{}}
	if name == "qemu-nbd" {
		dir, err := os.MkdirTemp("", "lkq")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		args = append([]string{"-t", "-k", filepath.Join(dir, "s")}, args...)
	}
	h.cmd = exec.Command(name, args...)
	h.cmd.Stderr = h.err
	if name == "qemu-io" {
		var err error
		if h.stdin, err = h.cmd.StdinPipe(); err != nil {
			t.Fatal(err)
		}
	}
	if err := h.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.stop)
	waitLocked(t, h.cmd.Process.Pid, watch)
	return h
}

func (h *qemuHolder) stop() {
	if h.cmd.ProcessState != nil {
		return
	}
	// Cleanly (qemu-io at the end of its input, qemu-nbd on SIGTERM), so
	// that QEMU stores the bitmaps back.
	if h.stdin != nil {
		h.stdin.Close()
	} else {
		h.cmd.Process.Signal(syscall.SIGTERM)
	}
	done := make(chan struct{})
	go func() { h.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		h.cmd.Process.Kill()
		<-done
	}
}

// refusedCLI runs an nbdgw command that must be refused for a lock: exit
// 1, one line naming file and saying want (QEMU's wording), no change to
// the chain, and the locks on the chain the same as before.
func refusedCLI(t *testing.T, bin string, files []string, file, want string, args ...string) {
	t.Helper()
	before := hardFingerprints(t, files)
	locks := map[string][]string{}
	for _, f := range files {
		locks[f] = lockLines(t, f)
	}
	r := hardExec(20*time.Second, bin, args...)
	hardSane(t, r)
	// The error is the last line (warnings may come before it).
	lines := strings.Split(strings.TrimSpace(string(r.stderr)), "\n")
	msg := lines[len(lines)-1]
	if r.code != 1 || !strings.Contains(msg, file) || !strings.Contains(msg, want) ||
		!strings.Contains(msg, "Is another process using the image") {
		t.Errorf("%s: want exit 1 and one line about %s saying %q\n%s", r.args, file, want, r)
	}
	after := hardFingerprints(t, files)
	for _, f := range files {
		if before[f] != after[f] {
			t.Errorf("%s refused but changed %s: %s -> %s", r.args, f, before[f], after[f])
		}
		// The refused process has exited, so its own locks are gone;
		// what must not appear is a lock that stays (a child left
		// holding it). The holder's lines may come and go meanwhile
		// (qemu-nbd drops and retakes its locks around a client), so
		// wait a moment for no line beyond those held before.
		deadline := time.Now().Add(3 * time.Second)
		for {
			extra := linesNotIn(lockLines(t, f), locks[f])
			if len(extra) == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("%s refused but left locks on %s:\n%s\nbefore:\n%s", r.args, f, strings.Join(extra, "\n"), strings.Join(locks[f], "\n"))
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// qemuRefused runs a QEMU tool that must fail with want (its lock error).
func qemuRefused(t *testing.T, want, name string, args ...string) {
	t.Helper()
	// Bounded: a qemu-nbd that is not refused would serve forever.
	r := hardExec(20*time.Second, name, args...)
	if r.code == 0 || r.timedOut || !strings.Contains(string(r.stderr), want) || !strings.Contains(string(r.stderr), "Is another process using the image") {
		t.Errorf("%s; want QEMU's lock error %q", r, want)
	}
}

// qemuWorks runs a QEMU tool that must succeed.
func qemuWorks(t *testing.T, name string, args ...string) {
	t.Helper()
	if r := hardExec(20*time.Second, name, args...); r.code != 0 {
		t.Errorf("%s", r)
	}
}

// TestLockQEMUHolds: while QEMU holds the image, every nbdgw door is
// refused exactly where QEMU's own tools are refused.
func TestLockQEMUHolds(t *testing.T) {
	hardRequire(t, "qemu-img", "qemu-io", "qemu-nbd")
	bin := nbdgwBinary(t)
	dir, top, base := lockFiles(t)
	files := []string{top, base}
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}

	t.Run("qemu-nbd writable", func(t *testing.T) {
		holdQEMU(t, top, "qemu-nbd", top)
		// QEMU's own reader is refused: so is every nbdgw door.
		qemuRefused(t, `Failed to get shared "write" lock`, "qemu-img", "info", top)
		qemuRefused(t, `Failed to get "write" lock`, "qemu-io", "-c", "write 0 64k", top)
		refusedCLI(t, bin, files, top, `Failed to get "write" lock, held by qemu-nbd (pid `, "serve", "--writable", "--socket", filepath.Join(dir, "s1"), top)
		refusedCLI(t, bin, files, top, `Failed to get shared "write" lock, held by qemu-nbd`, "serve", "--socket", filepath.Join(dir, "s2"), top)
		refusedCLI(t, bin, files, top, `Failed to get shared "write" lock`, "serve", "--snapshot", "--socket", filepath.Join(dir, "s3"), top)
		refusedCLI(t, bin, files, top, `Failed to get shared "write" lock`, "map", top)
		refusedCLI(t, bin, files, top, `Failed to get shared "write" lock`, "info", top)
		refusedCLI(t, bin, files, top, `Failed to get shared "write" lock`, "mount", top, mnt)
		refusedCLI(t, bin, files, top, `Failed to get "write" lock`, "attach", "--writable", top)
		refusedCLI(t, bin, files, top, `Failed to get shared "write" lock`, "attach", top)
		// -U: QEMU and nbdgw both read anyway; nbdgw warns.
		qemuWorks(t, "qemu-img", "info", "-U", top)
		for _, args := range [][]string{{"info", "-U", top}, {"map", "-U", top}} {
			r := hardExec(20*time.Second, bin, args...)
			hardSane(t, r)
			if r.code != 0 || !strings.Contains(string(r.stderr), "force-share") {
				t.Errorf("%s: want success and a force-share warning\n%s", r.args, r)
			}
		}
		r := hardExec(20*time.Second, bin, "serve", "-U", "--writable", top)
		if r.code == 0 || !strings.Contains(string(r.stderr), "read-only") {
			t.Errorf("serve -U --writable: want a refusal like QEMU's\n%s", r)
		}
	})

	t.Run("qemu-io writer", func(t *testing.T) {
		holdQEMU(t, top, "qemu-io", "-f", "qcow2", top)
		refusedCLI(t, bin, files, top, `Failed to get shared "write" lock, held by qemu-io`, "serve", "--socket", filepath.Join(dir, "s4"), top)
		refusedCLI(t, bin, files, top, `Failed to get "write" lock, held by qemu-io`, "serve", "--writable", "--socket", filepath.Join(dir, "s5"), top)
	})

	t.Run("qemu-nbd read-only", func(t *testing.T) {
		holdQEMU(t, top, "qemu-nbd", "-r", top)
		qemuRefused(t, `Failed to get "write" lock`, "qemu-io", "-c", "write 0 64k", top)
		refusedCLI(t, bin, files, top, `Failed to get "write" lock, held by qemu-nbd`, "serve", "--writable", "--socket", filepath.Join(dir, "s6"), top)
		// Readers share.
		qemuWorks(t, "qemu-img", "info", top)
		r := hardExec(20*time.Second, bin, "info", top)
		if r.code != 0 {
			t.Errorf("nbdgw info beside qemu-nbd -r: %s", r)
		}
	})

	t.Run("writer on the backing file", func(t *testing.T) {
		holdQEMU(t, base, "qemu-io", "-f", "qcow2", base)
		refusedCLI(t, bin, files, base, `Failed to get shared "write" lock, held by qemu-io`, "serve", "--writable", "--socket", filepath.Join(dir, "s7"), top)
		refusedCLI(t, bin, files, base, `Failed to get shared "write" lock`, "map", top)
		// The top alone is not in use.
		r := hardExec(20*time.Second, bin, "info", "--no-backing", top)
		if r.code != 0 {
			t.Errorf("nbdgw info --no-backing: %s", r)
		}
	})
}

// TestLockNbdgwHolds: while nbdgw serves or mounts the image, QEMU's tools
// are refused with their own lock errors, a second nbdgw is refused, and
// the locks go away with the process, whether it stops on SIGTERM or is
// killed.
func TestLockNbdgwHolds(t *testing.T) {
	hardRequire(t, "qemu-img", "qemu-io", "qemu-nbd")
	bin := nbdgwBinary(t)
	dir, top, base := lockFiles(t)
	files := []string{top, base}

	writerRefused := func(t *testing.T) {
		t.Helper()
		qemuRefused(t, `Failed to get "write" lock`, "qemu-io", "-c", "write 0 64k", top)
		qemuRefused(t, `Failed to get "write" lock`, "qemu-nbd", "-k", filepath.Join(dir, "q"), top)
		// The backing file is locked read-only, shared: no writer.
		qemuRefused(t, `Failed to get "write" lock`, "qemu-io", "-f", "qcow2", "-c", "write 0 64k", base)
		qemuWorks(t, "qemu-io", "-r", "-f", "qcow2", "-c", "read 0 64k", base)
	}
	unlocked := func(t *testing.T, what string) {
		t.Helper()
		for _, f := range files {
			if l := lockLines(t, f); len(l) > 0 {
				t.Errorf("%s: locks left on %s: %q", what, f, l)
			}
		}
		qemuWorks(t, "qemu-io", "-c", "write -P 3 0 64k", top)
	}

	t.Run("serve --writable", func(t *testing.T) {
		s, r := hardServe(t, bin, "--writable", top)
		if s == nil {
			t.Fatalf("serve: %s", r)
		}
		writerRefused(t)
		qemuRefused(t, `Failed to get shared "write" lock`, "qemu-img", "info", top)
		qemuWorks(t, "qemu-img", "info", "-U", top)
		refusedCLI(t, bin, files, top, `Failed to get "write" lock, held by nbdgw (pid `, "serve", "--writable", "--socket", filepath.Join(dir, "s1"), top)
		refusedCLI(t, bin, files, top, `Failed to get shared "write" lock, held by nbdgw`, "info", top)
		if r := s.stop(t); r.code != 0 {
			t.Errorf("serve after SIGTERM: %s", r)
		}
		unlocked(t, "after SIGTERM")
	})

	t.Run("serve read-only", func(t *testing.T) {
		s, r := hardServe(t, bin, top)
		if s == nil {
			t.Fatalf("serve: %s", r)
		}
		writerRefused(t)
		qemuWorks(t, "qemu-img", "info", top)
		qemuWorks(t, "qemu-io", "-r", "-c", "read 0 64k", top)
		// A second reader shares.
		if r := hardExec(20*time.Second, bin, "map", top); r.code != 0 {
			t.Errorf("nbdgw map beside a read-only serve: %s", r)
		}
		s.stop(t)
		unlocked(t, "after SIGTERM")
	})

	t.Run("serve --writable killed", func(t *testing.T) {
		s, r := hardServe(t, bin, "--writable", top)
		if s == nil {
			t.Fatalf("serve: %s", r)
		}
		writerRefused(t)
		s.cmd.Process.Signal(syscall.SIGKILL)
		<-s.exited
		unlocked(t, "after kill -9")
	})

	t.Run("mount", func(t *testing.T) {
		if why := hardFUSE(); why != "" {
			t.Fatalf("FUSE: %s", why)
		}
		m, r := hardMount(t, bin, top)
		if m == nil {
			t.Fatalf("mount: %s", r)
		}
		writerRefused(t)
		m.stop(t)
		unlocked(t, "after unmount")
	})

	t.Run("mount --writable", func(t *testing.T) {
		if why := hardFUSE(); why != "" {
			t.Fatalf("FUSE: %s", why)
		}
		m, r := hardMount(t, bin, "--writable", top)
		if m == nil {
			t.Fatalf("mount --writable: %s", r)
		}
		writerRefused(t)
		qemuRefused(t, `Failed to get shared "write" lock`, "qemu-img", "info", top)
		refusedCLI(t, bin, files, top, `Failed to get "write" lock, held by nbdgw`, "serve", "--writable", "--socket", filepath.Join(dir, "s2"), top)
		m.stop(t)
		unlocked(t, "after unmount")
	})
}

// linesNotIn returns the lines of a that b lacks.
func linesNotIn(a, b []string) []string {
	have := map[string]bool{}
	for _, l := range b {
		have[l] = true
	}
	var out []string
	for _, l := range a {
		if !have[l] {
			out = append(out, l)
		}
	}
	return out
}
