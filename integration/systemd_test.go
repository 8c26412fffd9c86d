package integration

import (
	"bufio"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// unitExecStart returns the ExecStart= words of a unit in contrib/systemd.
func unitExecStart(t *testing.T, unit string) []string {
	t.Helper()
	f, err := os.Open(filepath.Join("..", "contrib", "systemd", unit))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if v, ok := strings.CutPrefix(s.Text(), "ExecStart="); ok {
			return strings.Fields(v)
		}
	}
	t.Fatalf("%s has no ExecStart=", unit)
	return nil
}

// TestSystemdUnits runs the example units' command lines as systemd would:
// the socket-activated one with the listening socket as fd 3 and
// LISTEN_FDS/LISTEN_PID set, the template with NOTIFY_SOCKET (Type=notify)
// and its instance name for %I; a real client reads the export of each.
func TestSystemdUnits(t *testing.T) {
	for _, tool := range []string{"qemu-img", "nbdinfo", "sh"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not installed (scripts/install-deps.sh installs it)", tool)
		}
	}
	bin := nbdgwBinary(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.qcow2")
	runOutput(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "3M")

	t.Run("socket-activated", func(t *testing.T) {
		argv := unitExecStart(t, "nbdgw-activated.service")
		if argv[0] != "/usr/local/bin/nbdgw" || argv[len(argv)-1] != "/var/lib/images/disk.qcow2" {
			t.Fatalf("unexpected ExecStart %q", argv)
		}
		argv[0], argv[len(argv)-1] = bin, img
		sock := filepath.Join(dir, "act.sock")
		l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		l.SetUnlinkOnClose(false)
		lf, err := l.File()
		if err != nil {
			t.Fatal(err)
		}
		l.Close() // the duplicate in lf keeps listening
		// systemd sets LISTEN_PID to the pid of the process it execs:
		// the shell's own pid, which exec hands to nbdgw.
		cmd := exec.Command("sh", append([]string{"-c", `LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"`, "sh"}, argv...)...)
		cmd.ExtraFiles = []*os.File{lf}
		stderr := new(lockedBuffer)
		cmd.Stderr = stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		lf.Close()
		defer func() {
			cmd.Process.Signal(syscall.SIGTERM)
			if err := cmd.Wait(); err != nil {
				t.Errorf("after SIGTERM: %v\n%s", err, stderr)
			}
		}()
		out, err := exec.Command("nbdinfo", "--size", "nbd+unix:///disk?socket="+sock).CombinedOutput()
		if err != nil || strings.TrimSpace(string(out)) != "3145728" {
			t.Fatalf("nbdinfo over the activated socket: %v, %q\n%s", err, out, stderr)
		}
	})

	t.Run("notify-template", func(t *testing.T) {
		argv := unitExecStart(t, "nbdgw@.service")
		if argv[0] != "/usr/local/bin/nbdgw" || argv[len(argv)-1] != "%I" {
			t.Fatalf("unexpected ExecStart %q", argv)
		}
		// Another port than the unit's 10809, which a test must not take.
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := l.Addr().String()
		l.Close()
		for i, a := range argv {
			if a == "127.0.0.1:10809" {
				argv[i] = addr
			}
		}
		argv[0], argv[len(argv)-1] = bin, img
		notify := filepath.Join(dir, "notify")
		nl, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notify, Net: "unixgram"})
		if err != nil {
			t.Fatal(err)
		}
		defer nl.Close()
		cmd := exec.Command(argv[0], argv[1:]...)
		cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+notify)
		stderr := new(lockedBuffer)
		cmd.Stderr = stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() {
			cmd.Process.Signal(syscall.SIGTERM)
			if err := cmd.Wait(); err != nil {
				t.Errorf("after SIGTERM: %v\n%s", err, stderr)
			}
		}()
		nl.SetReadDeadline(time.Now().Add(20 * time.Second))
		buf := make([]byte, 32)
		n, err := nl.Read(buf)
		if err != nil || string(buf[:n]) != "READY=1" {
			t.Fatalf("no READY=1 (%q, %v)\n%s", buf[:n], err, stderr)
		}
		out, err := exec.Command("nbdinfo", "--size", "nbd://"+addr).CombinedOutput()
		if err != nil || strings.TrimSpace(string(out)) != "3145728" {
			t.Fatalf("nbdinfo once READY=1: %v, %q\n%s", err, out, stderr)
		}
	})
}
