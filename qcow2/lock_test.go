package qcow2

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func lockRequire(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed", tool)
		}
	}
	if !haveOFD() {
		t.Fatal("OFD locks unavailable on this kernel")
	}
}

// lockChain makes, with qemu-img, the files the lock tests open: a qcow2
// chain (top over base, top with a persistent bitmap), a raw file, a qcow2
// over that raw file and a qcow2 with an external data file.
func lockChain(t *testing.T) string {
	t.Helper()
	d := t.TempDir()
	mustRun(t, d, "qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "1M")
	mustRun(t, d, "qemu-io", "-f", "qcow2", "-c", "write -P 7 0 64k", "base.qcow2")
	mustRun(t, d, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2")
	mustRun(t, d, "qemu-img", "bitmap", "--add", "top.qcow2", "b0")
	mustRun(t, d, "qemu-img", "create", "-q", "-f", "raw", "plain.raw", "1M")
	mustRun(t, d, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "plain.raw", "-F", "raw", "onraw.qcow2")
	mustRun(t, d, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=ext.raw,data_file_raw=on", "withdata.qcow2", "1M")
	return d
}

// fileLockKey is how /proc spells a file in its lock lines.
func fileLockKey(t *testing.T, path string) string {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%02x:%02x:%d", unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino)
}

// procLocks reads the lock bytes process pid holds on each of files, from
// /proc/PID/fdinfo: "held 100,101 unshared 201" per file name. Only fds
// in skip (of this process) are ignored.
func procLocks(t *testing.T, pid int, dir string, files []string, keep func(fd string) bool) map[string]string {
	t.Helper()
	keys := map[string]string{}
	for _, f := range files {
		keys[fileLockKey(t, filepath.Join(dir, f))] = f
	}
	bytesOf := map[string]map[int]bool{}
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fdinfo", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if keep != nil && !keep(e.Name()) {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%s", pid, e.Name()))
		if err != nil {
			continue
		}
		for _, l := range parseFdinfoLocks(string(b)) {
			name, ok := keys[l.file]
			if !ok {
				continue
			}
			if bytesOf[name] == nil {
				bytesOf[name] = map[int]bool{}
			}
			for off := lockPermBase; off < lockSharedBase+numPerms; off++ {
				if l.covers(off) {
					bytesOf[name][off] = true
				}
			}
		}
	}
	out := map[string]string{}
	for _, f := range files {
		var held, unshared []string
		for i := 0; i < numPerms; i++ {
			if bytesOf[f][lockPermBase+i] {
				held = append(held, permNames[i])
			}
			if bytesOf[f][lockSharedBase+i] {
				unshared = append(unshared, permNames[i])
			}
		}
		out[f] = fmt.Sprintf("holds [%s] unshares [%s]", strings.Join(held, ","), strings.Join(unshared, ","))
	}
	return out
}

// startQEMU runs a QEMU tool that keeps the image open (qemu-nbd on a
// socket in dir, or qemu-io reading commands from a pipe) until stop.
func startQEMU(t *testing.T, dir, watch string, name string, args ...string) (pid int, stop func()) {
	t.Helper()
	sock := ""
	if name == "qemu-nbd" {
		sock = filepath.Join(dir, fmt.Sprintf("q%d.sock", time.Now().UnixNano()))
		// -t: without it qemu-nbd exits when the readiness probe
		// below disconnects.
		args = append([]string{"-t", "-k", sock}, args...)
	}
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	var errb bytes.Buffer
	cmd.Stderr = &errb
	var stdin io.WriteCloser
	if name == "qemu-io" {
		var err error
		if stdin, err = cmd.StdinPipe(); err != nil {
			t.Fatal(err)
		}
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	stop = func() {
		if stdin != nil {
			stdin.Close()
		}
		cmd.Process.Kill()
		cmd.Wait()
	}
	if sock != "" {
		for i := 0; ; i++ {
			if c, err := net.Dial("unix", sock); err == nil {
				c.Close()
				break
			}
			if i > 500 {
				stop()
				t.Fatalf("%s %v did not start: %s", name, args, errb.String())
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	// Wait until the tool holds its locks on watch, and they have settled.
	stableLocks(t, cmd.Process.Pid, dir, []string{watch})
	return cmd.Process.Pid, stop
}

// stableLocks is procLocks of a QEMU process once its locks have settled:
// qemu-nbd drops and retakes them briefly around a client's disconnect
// (the readiness probe's).
func stableLocks(t *testing.T, pid int, dir string, files []string) map[string]string {
	t.Helper()
	prev := procLocks(t, pid, dir, files, nil)
	for i := 0; i < 100; i++ {
		time.Sleep(50 * time.Millisecond)
		cur := procLocks(t, pid, dir, files, nil)
		if fmt.Sprint(cur) == fmt.Sprint(prev) && cur[files[0]] != "holds [] unshares []" {
			return cur
		}
		prev = cur
	}
	t.Fatalf("locks of pid %d never settled: %v", pid, prev)
	return nil
}

// ourLocks is procLocks for the files img has open.
func ourLocks(t *testing.T, img *Image, dir string, files []string) map[string]string {
	t.Helper()
	fds := map[string]bool{}
	for _, l := range img.layers {
		for _, h := range l.hostFiles() {
			fds[fmt.Sprint(h.f.Fd())] = true
		}
	}
	return procLocks(t, os.Getpid(), dir, files, func(fd string) bool { return fds[fd] })
}

// TestLockLayoutMatchesQEMU: for each way of opening an image, nbdgw holds
// exactly the lock bytes QEMU 10.0 holds on every file of the chain, read
// from /proc/PID/fdinfo of a running qemu-nbd (qemu-io for force-share,
// which qemu-nbd does not offer).
func TestLockLayoutMatchesQEMU(t *testing.T) {
	lockRequire(t, "qemu-img", "qemu-io", "qemu-nbd")
	d := lockChain(t)
	cases := []struct {
		name  string
		tool  string
		args  []string
		image string
		opts  Options
		files []string
	}{
		{"qcow2 read-only", "qemu-nbd", []string{"-r"}, "top.qcow2", Options{}, []string{"top.qcow2", "base.qcow2"}},
		{"qcow2 writable", "qemu-nbd", nil, "top.qcow2", Options{Writable: true}, []string{"top.qcow2", "base.qcow2"}},
		{"qcow2 snapshot", "qemu-nbd", []string{"-s"}, "top.qcow2", Options{Snapshot: true}, []string{"top.qcow2", "base.qcow2"}},
		{"qcow2 no backing", "qemu-nbd", []string{"-r", "--image-opts"}, "driver=qcow2,backing=,file.filename=top.qcow2", Options{NoBacking: true}, []string{"top.qcow2", "base.qcow2"}},
		{"raw read-only", "qemu-nbd", []string{"-r", "-f", "raw"}, "plain.raw", Options{Format: "raw"}, []string{"plain.raw"}},
		{"raw writable", "qemu-nbd", []string{"-f", "raw"}, "plain.raw", Options{Format: "raw", Writable: true}, []string{"plain.raw"}},
		{"raw snapshot", "qemu-nbd", []string{"-s", "-f", "raw"}, "plain.raw", Options{Format: "raw", Snapshot: true}, []string{"plain.raw"}},
		{"raw backing", "qemu-nbd", []string{"-r"}, "onraw.qcow2", Options{}, []string{"onraw.qcow2", "plain.raw"}},
		{"raw backing writable", "qemu-nbd", nil, "onraw.qcow2", Options{Writable: true}, []string{"onraw.qcow2", "plain.raw"}},
		{"external data file", "qemu-nbd", []string{"-r"}, "withdata.qcow2", Options{}, []string{"withdata.qcow2", "ext.raw"}},
		{"force share", "qemu-io", []string{"-r", "-U"}, "top.qcow2", Options{ForceShare: true}, []string{"top.qcow2", "base.qcow2"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			pid, stop := startQEMU(t, d, c.files[0], c.tool, append(c.args, c.image)...)
			want := stableLocks(t, pid, d, c.files)
			stop()
			path := c.image
			if strings.Contains(path, "=") {
				path = "top.qcow2"
			}
			c.opts.Warn = func(string) {}
			img, err := Open(filepath.Join(d, path), c.opts)
			if err != nil {
				t.Fatal(err)
			}
			got := ourLocks(t, img, d, c.files)
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			for _, f := range c.files {
				if got[f] != want[f] {
					t.Errorf("%s: nbdgw %s, QEMU (%s %v) %s", f, got[f], c.tool, c.args, want[f])
				}
			}
			t.Logf("%v", want)
			// Closed: nothing of ours is left on any file.
			for f, l := range procLocks(t, os.Getpid(), d, c.files, nil) {
				if l != "holds [] unshares []" {
					t.Errorf("%s after Close: %s", f, l)
				}
			}
		})
	}
}

// TestLockConflicts: opens exclude each other as QEMU's do, in both
// directions, and a refused open changes no byte of the chain and leaves
// no lock behind.
func TestLockConflicts(t *testing.T) {
	lockRequire(t, "qemu-img", "qemu-io", "qemu-nbd")
	d := lockChain(t)
	top, base := filepath.Join(d, "top.qcow2"), filepath.Join(d, "base.qcow2")
	quiet := func(string) {}
	refused := func(t *testing.T, opts Options, wantFile, wantMsg string) {
		t.Helper()
		// Sums now: a writable QEMU has marked the bitmap in_use.
		before := fileSums(t, top, base)
		opts.Warn = quiet
		img, err := Open(top, opts)
		if err == nil {
			img.Close()
			t.Fatalf("Open(%+v) succeeded", opts)
		}
		var le *LockError
		if !errors.Is(err, ErrLocked) || !errors.As(err, &le) {
			t.Fatalf("Open(%+v): %v, not a lock error", opts, err)
		}
		if le.File != wantFile || !strings.Contains(err.Error(), wantMsg) || strings.Contains(err.Error(), "\n") {
			t.Errorf("Open(%+v): %q, want a line about %s saying %q", opts, err, wantFile, wantMsg)
		}
		if after := fileSums(t, top, base); !equalSums(before, after) {
			t.Errorf("Open(%+v) refused but changed the chain", opts)
		}
		for f, l := range procLocks(t, os.Getpid(), d, []string{"top.qcow2", "base.qcow2"}, nil) {
			if l != "holds [] unshares []" {
				t.Errorf("refused Open(%+v) left locks on %s: %s", opts, f, l)
			}
		}
	}

	t.Run("qemu-nbd writer", func(t *testing.T) {
		_, stop := startQEMU(t, d, "top.qcow2", "qemu-nbd", "top.qcow2")
		defer stop()
		refused(t, Options{Writable: true}, top, `Failed to get "write" lock, held by qemu-nbd (pid `)
		refused(t, Options{}, top, `Failed to get shared "write" lock, held by qemu-nbd`)
		refused(t, Options{Snapshot: true}, top, `Failed to get shared "write" lock`)
		img, err := Open(top, Options{ForceShare: true, Warn: quiet})
		if err != nil {
			t.Fatalf("force share: %v", err)
		}
		img.Close()
	})
	t.Run("qemu-io writer on backing file", func(t *testing.T) {
		_, stop := startQEMU(t, d, "base.qcow2", "qemu-io", "-f", "qcow2", "base.qcow2")
		defer stop()
		// top has a persistent bitmap: a writable open that got as far
		// as marking it in_use would change top.qcow2.
		refused(t, Options{Writable: true}, base, `Failed to get shared "write" lock, held by qemu-io`)
		// The top opened alone does not lock its backing file. (Writable
		// with NoBacking is refused by policy when there is a backing
		// file, before any lock.)
		img, err := Open(top, Options{NoBacking: true, Warn: quiet})
		if err != nil {
			t.Fatalf("top alone: %v", err)
		}
		img.Close()
	})
	t.Run("qemu-nbd reader", func(t *testing.T) {
		_, stop := startQEMU(t, d, "top.qcow2", "qemu-nbd", "-r", "top.qcow2")
		defer stop()
		refused(t, Options{Writable: true}, top, `Failed to get "write" lock, held by qemu-nbd`)
		img, err := Open(top, Options{Warn: quiet})
		if err != nil {
			t.Fatalf("two readers: %v", err)
		}
		img.Close()
	})

	// nbdgw holding the image: QEMU is refused with its own messages.
	qemuRefused := func(t *testing.T, want string, name string, args ...string) {
		t.Helper()
		out, err := exec.Command(name, args...).CombinedOutput()
		if err == nil || !strings.Contains(string(out), want) {
			t.Errorf("%s %v while nbdgw holds the image: %v, %s; want %q", name, args, err, out, want)
		}
	}
	t.Run("nbdgw writer", func(t *testing.T) {
		img, err := Open(top, Options{Writable: true, Warn: quiet})
		if err != nil {
			t.Fatal(err)
		}
		defer img.Close()
		qemuRefused(t, `Failed to get shared "write" lock`, "qemu-img", "info", top)
		qemuRefused(t, `Failed to get "write" lock`, "qemu-io", "-c", "write 0 64k", top)
		qemuRefused(t, `Failed to get "write" lock`, "qemu-io", "-f", "qcow2", "-c", "write 0 64k", base)
		if out, err := exec.Command("qemu-img", "info", "-U", top).CombinedOutput(); err != nil {
			t.Errorf("qemu-img info -U: %v\n%s", err, out)
		}
		if out, err := exec.Command("qemu-io", "-r", "-c", "read 0 64k", base).CombinedOutput(); err != nil {
			t.Errorf("reading the backing file: %v\n%s", err, out)
		}
		// A second open in this process is another user, as in QEMU.
		second, err := Open(top, Options{Writable: true, Warn: quiet})
		if err == nil {
			second.Close()
			t.Fatal("second writable open succeeded")
		}
		if !strings.Contains(err.Error(), "another open in this process") {
			t.Errorf("second open: %v", err)
		}
	})
	t.Run("nbdgw reader", func(t *testing.T) {
		img, err := Open(top, Options{Warn: quiet})
		if err != nil {
			t.Fatal(err)
		}
		defer img.Close()
		qemuRefused(t, `Failed to get "write" lock`, "qemu-io", "-c", "write 0 64k", top)
		if out, err := exec.Command("qemu-img", "info", top).CombinedOutput(); err != nil {
			t.Errorf("qemu-img info beside a reader: %v\n%s", err, out)
		}
	})
}

// TestForceShare: force share opens read-only whatever holds the image,
// warns, and is refused with writes as QEMU refuses it.
func TestForceShare(t *testing.T) {
	lockRequire(t, "qemu-img", "qemu-nbd")
	d := lockChain(t)
	top := filepath.Join(d, "top.qcow2")
	for _, o := range []Options{{ForceShare: true, Writable: true}, {ForceShare: true, Snapshot: true}} {
		if img, err := Open(top, o); err == nil {
			img.Close()
			t.Errorf("Open(%+v) succeeded", o)
		} else if !strings.Contains(err.Error(), "read-only") {
			t.Errorf("Open(%+v): %v", o, err)
		}
	}
	_, stop := startQEMU(t, d, "top.qcow2", "qemu-nbd", "top.qcow2")
	defer stop()
	var warned []string
	img, err := Open(top, Options{ForceShare: true, Warn: func(m string) { warned = append(warned, m) }})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if img.Writable() {
		t.Error("force share opened writable")
	}
	if len(warned) == 0 || !strings.Contains(warned[0], "force-share") || !strings.Contains(warned[0], "inconsistent") {
		t.Errorf("warnings %q", warned)
	}
}

func TestParseFdinfoLocks(t *testing.T) {
	text := "pos:\t0\nflags:\t02100002\nlock:\t1: OFDLCK ADVISORY  READ -1 fe:00:10093759 100 101\n" +
		"lock:\t2: POSIX  ADVISORY  WRITE 77 fe:00:10093759 203 EOF\nlock:\tbad\n"
	got := parseFdinfoLocks(text)
	want := []fdLock{{"fe:00:10093759", 100, 101}, {"fe:00:10093759", 203, -1}}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	if !got[0].covers(101) || got[0].covers(102) || !got[1].covers(1<<40) {
		t.Error("covers")
	}
}

// TestLockByteHeldExclusively: a foreign exclusive lock on a lock byte
// (not QEMU's protocol, but possible) makes QEMU and nbdgw fail alike:
// "Failed to lock byte 100".
func TestLockByteHeldExclusively(t *testing.T) {
	lockRequire(t, "qemu-img", "qemu-io")
	d := lockChain(t)
	top := filepath.Join(d, "top.qcow2")
	f, err := os.OpenFile(top, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fl := unix.Flock_t{Type: unix.F_WRLCK, Start: lockPermBase, Len: 1}
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &fl); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("qemu-io", "-r", "-c", "read 0 512", top).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "Failed to lock byte 100") {
		t.Fatalf("qemu-io beside an exclusive lock on byte 100: %v, %s", err, out)
	}
	_, err = Open(top, Options{Warn: func(string) {}})
	if err == nil || !errors.Is(err, ErrLocked) || !strings.Contains(err.Error(), "Failed to lock byte 100, held by another open in this process") {
		t.Fatalf("Open beside an exclusive lock on byte 100: %v", err)
	}
	own := fmt.Sprint(f.Fd())
	for name, l := range procLocks(t, os.Getpid(), d, []string{"top.qcow2"}, func(fd string) bool { return fd != own }) {
		if l != "holds [] unshares []" {
			t.Errorf("refused Open left locks on %s: %s", name, l)
		}
	}
}
