package integration

// nbdgw backup against real servers (nbdgw serve, qemu-nbd, nbdkit),
// checked with QEMU's tools.

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nbdgw/nbdgw/nbdserver/testcerts"
)

// bkRun runs a program in dir and returns its output and exit code.
func bkRun(t *testing.T, dir, name string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	var o, e strings.Builder
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		code = ee.ExitCode()
	case err != nil:
		t.Fatalf("%s: %v", name, err)
	}
	return o.String(), e.String(), code
}

// bkMust runs a program in dir that must succeed.
func bkMust(t *testing.T, dir, name string, args ...string) string {
	t.Helper()
	o, e, code := bkRun(t, dir, name, args...)
	if code != 0 {
		t.Fatalf("%s %q: exit %d\n%s%s", name, args, code, o, e)
	}
	return o + e
}

// bkServer starts a server listening on sock and returns a function that
// stops it (also run at cleanup).
func bkServer(t *testing.T, dir, sock, name string, args ...string) func() {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	var stderr lockedBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cmd.Process.Signal(syscall.SIGTERM)
			cmd.Wait()
			os.Remove(sock)
		})
	}
	t.Cleanup(stop)
	for i := 0; i < 100; i++ {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			if strings.HasPrefix(filepath.Base(name), "qemu-nbd") {
				// qemu-nbd counts the probe as a client; give it time
				// to see it leave.
				time.Sleep(50 * time.Millisecond)
			}
			return stop
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s does not listen on %s\n%s", name, sock, stderr.String())
	return nil
}

// bkAlone is how QEMU opens a qcow2 file without its backing file.
func bkAlone(path string) string {
	return fmt.Sprintf(`json:{"driver":"qcow2","backing":null,"file":{"driver":"file","filename":%q}}`, path)
}

// bkMapEntry is a qemu-img map --output=json entry less offset and
// compressed (nbdgw writes compressed clusters uncompressed).
type bkMapEntry struct {
	Start, Length int64
	Depth         int
	Present       bool
	Zero          bool
	Data          bool
}

// bkMap is qemu-img map --output=json of spec, offsets dropped and
// entries that then look alike merged.
func bkMap(t *testing.T, dir, spec string) []bkMapEntry {
	t.Helper()
	var es []bkMapEntry
	if err := json.Unmarshal([]byte(bkMust(t, dir, "qemu-img", "map", "--output=json", spec)), &es); err != nil {
		t.Fatal(err)
	}
	var out []bkMapEntry
	for _, e := range es {
		if n := len(out); n > 0 {
			p := out[n-1]
			p.Start, p.Length = e.Start, e.Length
			if p == e {
				out[n-1].Length += e.Length
				continue
			}
		}
		out = append(out, e)
	}
	return out
}

func bkIdentical(t *testing.T, dir, a, b string) {
	t.Helper()
	if s := bkMust(t, dir, "qemu-img", "compare", a, b); !strings.Contains(s, "Images are identical") {
		t.Errorf("qemu-img compare %s %s: %s", a, b, s)
	}
}

// bkCheckLayer: OUT alone maps as the top layer alone, OUT reads as the
// source chain, qemu-img check is clean.
func bkCheckLayer(t *testing.T, dir, top, out string) {
	t.Helper()
	bkMust(t, dir, "qemu-img", "check", out)
	want, got := bkMap(t, dir, bkAlone(top)), bkMap(t, dir, bkAlone(out))
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("qemu-img map of %s alone:\n%v\nof %s alone:\n%v", out, got, top, want)
	}
	bkIdentical(t, dir, out, top)
}

func bkNoOutput(t *testing.T, dir, out string) {
	t.Helper()
	if _, err := os.Stat(filepath.Join(dir, out)); err == nil {
		t.Errorf("%s left behind", out)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, ".*.partial")); len(left) > 0 {
		t.Errorf("temporary files left behind: %v", left)
	}
}

// bkLayerImages builds the seed's top.qcow2 over base.raw and a chain
// with subclusters, zeroes over data and discards, sub.qcow2 over
// subbase.qcow2.
func bkLayerImages(t *testing.T, dir string) {
	for _, c := range [][]string{
		{"qemu-img", "create", "-q", "-f", "raw", "base.raw", "256K"},
		{"qemu-io", "-f", "raw", "-c", "write -P 65 0 64k", "-c", "write -P 66 64k 64k", "-c", "write -P 67 128k 64k", "base.raw"},
		{"qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "top.qcow2"},
		{"qemu-io", "-f", "qcow2", "-c", "write -P 69 64k 64k", "-c", "write -z 128k 64k", "top.qcow2"},
		{"qemu-img", "create", "-q", "-f", "qcow2", "subbase.qcow2", "4M"},
		{"qemu-io", "-c", "write -P 1 0 4M", "subbase.qcow2"},
		{"qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=128k", "-b", "subbase.qcow2", "-F", "qcow2", "sub.qcow2"},
		{"qemu-io", "-c", "write -P 2 8k 8k", "-c", "write -z 64k 32k", "-c", "write -P 3 1M 256k", "-c", "discard 1M 128k", "-c", "write -z 3M 4k", "sub.qcow2"},
	} {
		bkMust(t, dir, c[0], c[1:]...)
	}
}

// TestBackupLayer: layer backups from nbdgw serve (qemu:joint-allocation)
// and qemu-nbd -A (base:allocation + qemu:allocation-depth) rebuild the
// layer; nbdkit, which can say neither, is refused.
func TestBackupLayer(t *testing.T) {
	nbdRequire(t, "nbdkit")
	bin := nbdgwBinary(t)
	dir := t.TempDir()
	bkLayerImages(t, dir)
	sock := filepath.Join(dir, "s.sock")
	uri := nbdURI(sock)
	for _, im := range []struct{ top, base string }{{"top.qcow2", "base.raw"}, {"sub.qcow2", "subbase.qcow2"}} {
		for _, srv := range []struct {
			name string
			args []string
			used string
		}{
			{bin, []string{"serve", "--socket", sock, "--no-backing", im.top}, "using qemu:joint-allocation"},
			{bin, []string{"serve", "--socket", sock, im.top}, "using qemu:joint-allocation"},
			{"qemu-nbd", []string{"-r", "-t", "-e", "4", "-k", sock, "-f", "qcow2", "-A", bkAlone(im.top)}, "using base:allocation + qemu:allocation-depth, 4 connection(s)"},
		} {
			out := fmt.Sprintf("out-%s-%s-%d.qcow2", im.top, filepath.Base(srv.name), len(srv.args))
			stop := bkServer(t, dir, sock, srv.name, srv.args...)
			_, e, code := bkRun(t, dir, bin, "backup", "--layer", "--backing", im.base, uri, out)
			stop()
			if code != 0 || !strings.Contains(e, srv.used) || !strings.Contains(e, "read ") {
				t.Fatalf("%s %q: exit %d, want a summary saying %q:\n%s", srv.name, srv.args, code, srv.used, e)
			}
			bkCheckLayer(t, dir, im.top, out)
		}
	}
	// The seed's expectation, read by QEMU: A, E, zeroes, zeroes.
	for i, p := range []int{65, 69, 0, 0} {
		s := bkMust(t, dir, "qemu-io", "-r", "-c", fmt.Sprintf("read -P %d %d 64k", p, i*65536), "out-top.qcow2-nbdgw-4.qcow2")
		if strings.Contains(s, "verification failed") {
			t.Errorf("cluster %d: %s", i, s)
		}
	}
	// A local source: the chain, or the top layer alone.
	for _, nb := range []string{"", "--no-backing"} {
		out := "local" + nb + ".qcow2"
		args := []string{"backup", "--layer", "--backing", "subbase.qcow2", "sub.qcow2", out}
		if nb != "" {
			args = append(args, nb)
		}
		if e := bkMust(t, dir, bin, args...); !strings.Contains(e, "local block status") {
			t.Errorf("local: %s", e)
		}
		bkCheckLayer(t, dir, "sub.qcow2", out)
	}
	// nbdkit reports base:allocation only: no way to tell what is local.
	stop := bkServer(t, dir, sock, "nbdkit", "-f", "-U", sock, "file", "base.raw")
	_, e, code := bkRun(t, dir, bin, "backup", "--layer", uri, "nbdkit.qcow2")
	stop()
	if code != 1 || !strings.Contains(e, "offers neither qemu:joint-allocation nor base:allocation with qemu:allocation-depth") {
		t.Errorf("nbdkit --layer: exit %d\n%s", code, e)
	}
	bkNoOutput(t, dir, "nbdkit.qcow2")
	// A full backup from nbdkit works, in reads no larger than the
	// server's maximum block size.
	stop = bkServer(t, dir, sock, "nbdkit", "-f", "-U", sock, "--filter=blocksize-policy", "file", "base.raw",
		"blocksize-maximum=65536", "blocksize-error-policy=error")
	bkMust(t, dir, bin, "backup", uri, "nbdkit-full.qcow2")
	stop()
	bkIdentical(t, dir, "nbdkit-full.qcow2", "base.raw")
}

// TestBackupIncremental: full <- incr1 <- incr2 from qemu-nbd -B and from
// nbdgw serve read, at each step, as the source did then.
func TestBackupIncremental(t *testing.T) {
	nbdRequire(t)
	bin := nbdgwBinary(t)
	for _, server := range []string{"qemu-nbd", "nbdgw"} {
		t.Run(server, func(t *testing.T) {
			dir := t.TempDir()
			sock := filepath.Join(dir, "s.sock")
			bkMust(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "16M")
			bkMust(t, dir, "qemu-io", "-c", "write -P 1 0 12M", "img.qcow2")
			backup := func(out, bitmap string, args ...string) {
				t.Helper()
				var stop func()
				if server == "qemu-nbd" {
					sargs := []string{"-r", "-t", "-e", "4", "-k", sock, "-f", "qcow2"}
					if bitmap != "" {
						sargs = append(sargs, "-B", bitmap)
					}
					stop = bkServer(t, dir, sock, "qemu-nbd", append(sargs, "img.qcow2")...)
				} else {
					stop = bkServer(t, dir, sock, bin, "serve", "--socket", sock, "img.qcow2")
				}
				if bitmap != "" {
					args = append(args, "--bitmap", bitmap)
				}
				bkMust(t, dir, bin, append(append([]string{"backup"}, args...), nbdURI(sock), out)...)
				stop()
				bkMust(t, dir, "qemu-img", "check", out)
				bkMust(t, dir, "qemu-img", "convert", "-O", "raw", "img.qcow2", "at-"+out+".raw")
			}
			bkMust(t, dir, "qemu-img", "bitmap", "--add", "img.qcow2", "b1")
			backup("full.qcow2", "")
			bkMust(t, dir, "qemu-io", "-c", "write -P 2 1M 64k", "-c", "write -z 2M 1M", "-c", "discard 4M 128k", "-c", "write -P 3 14M 4k", "img.qcow2")
			bkMust(t, dir, "qemu-img", "bitmap", "--add", "img.qcow2", "b2")
			backup("incr1.qcow2", "b1", "--backing", "full.qcow2")
			bkMust(t, dir, "qemu-io", "-c", "write -P 4 0 8k", "-c", "write -z 1M 64k", "-c", "write -P 5 5M 128k", "img.qcow2")
			backup("incr2.qcow2", "b2", "--backing", "incr1.qcow2")
			for _, out := range []string{"full.qcow2", "incr1.qcow2", "incr2.qcow2"} {
				bkIdentical(t, dir, out, "at-"+out+".raw")
			}
			if s := bkMust(t, dir, "qemu-img", "info", "--backing-chain", "incr2.qcow2"); !strings.Contains(s, "backing file: incr1.qcow2") || !strings.Contains(s, "backing file: full.qcow2") {
				t.Errorf("chain:\n%s", s)
			}
			// A missing bitmap is refused, naming it.
			stop := bkServer(t, dir, sock, bin, "serve", "--socket", sock, "img.qcow2")
			_, e, code := bkRun(t, dir, bin, "backup", "--bitmap", "nope", "--backing", "incr2.qcow2", nbdURI(sock), "bad.qcow2")
			stop()
			if code != 1 || !strings.Contains(e, `no bitmap "nope"`) {
				t.Errorf("missing bitmap: exit %d\n%s", code, e)
			}
			bkNoOutput(t, dir, "bad.qcow2")
		})
	}
}

// bkCutProxy forwards unix connections to target and cuts each one once
// it has passed limit bytes from the server.
func bkCutProxy(t *testing.T, listen, target string, limit int64) {
	l, err := net.Listen("unix", listen)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("unix", target)
			if err != nil {
				c.Close()
				continue
			}
			go func() { io.Copy(s, c); s.Close() }()
			go func() { io.CopyN(c, s, limit); c.Close(); s.Close() }()
		}
	}()
}

// bkStallProxy forwards unix connections to target and, once limit
// bytes came from the server, stops forwarding without closing: a server
// that no longer answers.
func bkStallProxy(t *testing.T, listen, target string, limit int64) {
	l, err := net.Listen("unix", listen)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		l.Close()
		close(done)
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
	})
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("unix", target)
			if err != nil {
				c.Close()
				continue
			}
			mu.Lock()
			conns = append(conns, c, s)
			mu.Unlock()
			go io.Copy(s, c)
			go func() { io.CopyN(c, s, limit); <-done }()
		}
	}()
}

// TestBackupInterrupt: SIGINT while the server has stopped answering ends
// the backup at once, exit 1, with nothing left behind.
func TestBackupInterrupt(t *testing.T) {
	nbdRequire(t)
	bin := nbdgwBinary(t)
	dir := t.TempDir()
	bkMust(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "64M")
	bkMust(t, dir, "qemu-io", "-c", "write -P 7 0 64M", "img.qcow2")
	sock, stall := filepath.Join(dir, "s.sock"), filepath.Join(dir, "stall.sock")
	bkServer(t, dir, sock, bin, "serve", "--socket", sock, "img.qcow2")
	bkStallProxy(t, stall, sock, 8<<20)
	cmd := exec.Command(bin, "backup", nbdURI(stall), "out.qcow2")
	cmd.Dir = dir
	var stderr lockedBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	for i := 0; ; i++ {
		if tmp, _ := filepath.Glob(filepath.Join(dir, ".out.qcow2.*.partial")); len(tmp) > 0 {
			break
		}
		if i == 200 {
			t.Fatalf("no temporary OUT after 10 s\n%s", stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond) // blocked on the stalled server by now
	cmd.Process.Signal(syscall.SIGINT)
	select {
	case err := <-exited:
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(stderr.String(), "interrupted: out.qcow2 not written") {
			t.Errorf("after SIGINT: %v\n%s", err, stderr.String())
		}
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		t.Fatalf("still running 10 s after SIGINT\n%s", stderr.String())
	}
	bkNoOutput(t, dir, "out.qcow2")
}

// TestBackupBadInput: a server that goes away, a full disk, OUT that
// exists, a backing file of another size, bad usage: a clear error, exit
// 1 (2 for usage), and nothing left under OUT's name.
func TestBackupBadInput(t *testing.T) {
	nbdRequire(t)
	bin := nbdgwBinary(t)
	dir := t.TempDir()
	bkMust(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "32M")
	bkMust(t, dir, "qemu-io", "-c", "write -P 7 0 32M", "img.qcow2")
	bkMust(t, dir, "qemu-img", "create", "-q", "-f", "raw", "small.raw", "1M")
	sock := filepath.Join(dir, "s.sock")
	bkServer(t, dir, sock, bin, "serve", "--socket", sock, "img.qcow2")

	cut := filepath.Join(dir, "cut.sock")
	bkCutProxy(t, cut, sock, 4<<20)
	_, e, code := bkRun(t, dir, bin, "backup", nbdURI(cut), "cut.qcow2")
	if code != 1 || !strings.Contains(e, "reading the source") || !strings.Contains(e, "cut.qcow2 not written") {
		t.Errorf("server gone mid-way: exit %d\n%s", code, e)
	}
	bkNoOutput(t, dir, "cut.qcow2")

	_, e, code = bkRun(t, dir, bin, "backup", "--layer", "--backing", "small.raw", nbdURI(sock), "size.qcow2")
	if code != 1 || !strings.Contains(e, "small.raw is 1048576 bytes, the source 33554432") {
		t.Errorf("backing size: exit %d\n%s", code, e)
	}
	bkNoOutput(t, dir, "size.qcow2")

	bkMust(t, dir, "cp", "small.raw", "exists.qcow2")
	if _, e, code = bkRun(t, dir, bin, "backup", nbdURI(sock), "exists.qcow2"); code != 1 || !strings.Contains(e, "exists.qcow2 exists (use --force") {
		t.Errorf("OUT exists: exit %d\n%s", code, e)
	}
	bkMust(t, dir, bin, "backup", "--force", nbdURI(sock), "exists.qcow2")
	bkIdentical(t, dir, "exists.qcow2", "img.qcow2")

	for _, args := range [][]string{{"--layer", "--bitmap", "b"}, {nbdURI(sock)}, {"--connections", "0"}} {
		if _, e, code = bkRun(t, dir, bin, append(append([]string{"backup"}, args...), nbdURI(sock), "u.qcow2")...); code != 2 || !strings.Contains(e, "(see nbdgw help backup)") {
			t.Errorf("%q: exit %d\n%s", args, code, e)
		}
	}

	// A full disk: a 2 MiB tmpfs in a mount namespace of its own.
	full := filepath.Join(dir, "full")
	os.Mkdir(full, 0o755)
	script := fmt.Sprintf("mount -t tmpfs -o size=2M tmpfs %s && { %s backup %s %s/out.qcow2; echo rc=$?; ls -A %s; }", full, bin, nbdURI(sock), full, full)
	o, e, _ := bkRun(t, dir, "unshare", "-m", "sh", "-c", script)
	if !strings.Contains(o, "rc=1\n") || strings.TrimSpace(strings.SplitN(o, "rc=1\n", 2)[1]) != "" || !strings.Contains(e, "no space left on device") {
		t.Errorf("full disk:\nstdout:\n%s\nstderr:\n%s", o, e)
	}
}

// TestBackupProgress: -p draws a bar on a terminal, and nothing else
// changes.
func TestBackupProgress(t *testing.T) {
	nbdRequire(t, "script")
	bin := nbdgwBinary(t)
	dir := t.TempDir()
	bkMust(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "64M")
	bkMust(t, dir, "qemu-io", "-c", "write -P 7 0 64M", "img.qcow2")
	o := bkMust(t, dir, "script", "-qec", bin+" backup -p img.qcow2 out.qcow2", "/dev/null")
	if !strings.Contains(o, "[########################################] 100.0%") || !strings.Contains(o, "read 67108864 bytes, wrote 67108864, zeroed 0, skipped 0") {
		t.Errorf("terminal output:\n%q", o)
	}
	bkIdentical(t, dir, "out.qcow2", "img.qcow2")
	// Without a terminal, only the summary.
	_, e, _ := bkRun(t, dir, bin, "backup", "-p", "--force", "img.qcow2", "out.qcow2")
	if strings.Contains(e, "[#") {
		t.Errorf("progress bar without a terminal:\n%s", e)
	}
}

// TestBackupTLS: a layer backup over nbds+unix:// from a server that
// requires TLS and client certificates.
func TestBackupTLS(t *testing.T) {
	nbdRequire(t)
	bin := nbdgwBinary(t)
	dir := t.TempDir()
	bkLayerImages(t, dir)
	creds := t.TempDir()
	if err := testcerts.Write(creds, true); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "tls.sock")
	bkServer(t, dir, sock, bin, "serve", "--socket", sock, "--tls-creds", creds, "--tls-required", "--no-backing", "top.qcow2")
	e := bkMust(t, dir, bin, "backup", "--layer", "--backing", "base.raw", "nbds+unix:///?socket="+sock+"&tls-certificates="+creds, "out.qcow2")
	if !strings.Contains(e, "qemu:joint-allocation") {
		t.Errorf("summary: %s", e)
	}
	bkCheckLayer(t, dir, "top.qcow2", "out.qcow2")
}
