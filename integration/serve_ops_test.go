package integration

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestServeOperations: what scripts and systemd rely on. serve says one
// line when it listens, writes --pid-file then (and removes it at exit),
// tells $NOTIFY_SOCKET READY=1, and -v logs each client.
func TestServeOperations(t *testing.T) {
	for _, tool := range []string{"qemu-img", "nbdinfo"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not installed (scripts/install-deps.sh installs it)", tool)
		}
	}
	bin := nbdgwBinary(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "a.qcow2")
	runOutput(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "1M")
	sock := filepath.Join(dir, "s.sock")
	pid := filepath.Join(dir, "serve.pid")
	notify := filepath.Join(dir, "notify.sock")
	nl, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notify, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()

	cmd := exec.Command(bin, "serve", "-v", "-x", "disk", "--pid-file", pid, "-k", sock, img)
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+notify)
	stderr := new(lockedBuffer)
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()

	nl.SetReadDeadline(time.Now().Add(20 * time.Second))
	buf := make([]byte, 64)
	n, err := nl.Read(buf)
	if err != nil || string(buf[:n]) != "READY=1" {
		t.Fatalf("NOTIFY_SOCKET got %q, %v; stderr:\n%s", buf[:n], err, stderr)
	}
	// Ready means ready: the pid file, the line and the socket are there.
	b, err := os.ReadFile(pid)
	if err != nil || strings.TrimSpace(string(b)) != strconv.Itoa(cmd.Process.Pid) {
		t.Errorf("--pid-file holds %q (%v), want %d", b, err, cmd.Process.Pid)
	}
	want := `nbdgw serve: serving ` + img + ` as export "disk" (read-only) on unix:` + sock + "\n"
	// The line was written before READY=1, but it reaches stderr through a
	// pipe that exec's goroutine copies: give the copy a moment.
	for end := time.Now().Add(5 * time.Second); !strings.Contains(stderr.String(), "\n") && time.Now().Before(end); {
		time.Sleep(5 * time.Millisecond)
	}
	if got := stderr.String(); got != want {
		t.Errorf("ready line %q, want %q", got, want)
	}
	out := runOutput(t, "nbdinfo", "--size", "nbd+unix:///disk?socket="+sock)
	if strings.TrimSpace(string(out)) != "1048576" {
		t.Errorf("nbdinfo --size: %q", out)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(stderr.String(), "client disconnected") && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	log := stderr.String()
	for _, w := range []string{"msg=\"client connected\"", "msg=\"client negotiated\"", "export=disk", "mode=structured", "tls=false", "msg=\"client disconnected\""} {
		if !strings.Contains(log, w) {
			t.Errorf("-v log lacks %s:\n%s", w, log)
		}
	}
	cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err != nil {
		t.Errorf("after SIGTERM: %v\n%s", err, stderr)
	}
	if _, err := os.Stat(pid); !os.IsNotExist(err) {
		t.Errorf("pid file left after exit: %v", err)
	}
}
