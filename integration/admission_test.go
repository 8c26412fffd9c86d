package integration

// Fair service and connection admission of nbdgw serve, measured against
// qemu-nbd in the same run: stalled readers must hold back only their own
// connections (and bounded memory), idle connections must not lock out
// new clients. Each figure is logged for nbdgw and qemu-nbd side by side.

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nbdgw/nbdgw/nbdserver/nbdclient"
	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
)

// admPeak samples /proc/PID/status (VmRSS, VmHWM) every few milliseconds
// until stop is called, and returns the peaks.
func admPeak(pid int) (stop func() (rss, hwm int64)) {
	var peakRSS, peakHWM atomic.Int64
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		for {
			rss, hwm := hardProcRSS(pid)
			if rss > peakRSS.Load() {
				peakRSS.Store(rss)
			}
			if hwm > peakHWM.Load() {
				peakHWM.Store(hwm)
			}
			select {
			case <-done:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	}()
	return func() (int64, int64) {
		close(done)
		<-finished
		return peakRSS.Load(), peakHWM.Load()
	}
}

// admWaitDial waits until network/addr accepts a connection.
func admWaitDial(t testing.TB, p *hardProc, network, addr string) {
	t.Helper()
	deadline := time.Now().Add(hardStartWait)
	for time.Now().Before(deadline) {
		select {
		case <-p.exited:
			t.Fatalf("%v exited: %s", p.cmd.Args, p.stderr)
		default:
		}
		if c, err := net.Dial(network, addr); err == nil {
			c.Close()
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("%v: not listening on %s", p.cmd.Args, addr)
}

// admFreePort returns a TCP port on 127.0.0.1 free at the time of the call.
func admFreePort(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return fmt.Sprint(l.Addr().(*net.TCPAddr).Port)
}

// admServer is nbdgw serve or qemu-nbd, started for one measurement.
type admServer struct {
	name    string
	proc    *hardProc
	network string
	addr    string // socket path or HOST:PORT
}

func (s *admServer) uri() string {
	if s.network == "unix" {
		return "nbd+unix:///?socket=" + s.addr
	}
	return "nbd://" + s.addr
}

// admStart starts nbdgw serve (nbdgw true) or qemu-nbd on a unix socket
// (port "") or 127.0.0.1:port, read-only, and waits until it listens.
func admStart(t testing.TB, nbdgw bool, port, img string, extra ...string) *admServer {
	t.Helper()
	s := &admServer{network: "unix", addr: filepath.Join(t.TempDir(), "s")}
	if port != "" {
		s.network, s.addr = "tcp", "127.0.0.1:"+port
	}
	var args []string
	if nbdgw {
		s.name = "nbdgw"
		args = []string{"serve"}
		if port != "" {
			args = append(args, "--listen", s.addr)
		} else {
			args = append(args, "--socket", s.addr)
		}
		s.proc = hardStart(t, nbdgwBinary(t), append(append(args, extra...), img)...)
	} else {
		s.name = "qemu-nbd"
		args = []string{"-r", "-f", "qcow2", "-e", "0"}
		if port != "" {
			args = append(args, "-b", "127.0.0.1", "-p", port)
		} else {
			args = append(args, "-k", s.addr)
		}
		s.proc = hardStart(t, "qemu-nbd", append(append(args, extra...), img)...)
	}
	t.Cleanup(func() { s.proc.stop(t) })
	admWaitDial(t, s.proc, s.network, s.addr)
	return s
}

// admStalled opens n clients that each negotiate (half simple replies,
// half structured), send one READ of length bytes and never read.
func admStalled(t testing.TB, s *admServer, n int, size, length uint64) []net.Conn {
	t.Helper()
	var conns []net.Conn
	for k := 0; k < n; k++ {
		mode := nbdproto.Option(0)
		if k%2 == 1 {
			mode = nbdproto.OptStructuredReply
		}
		rc, err := hardHandshake(s.network, s.addr, mode)
		if err != nil {
			t.Fatalf("%s: stalled client %d: %v", s.name, k, err)
		}
		conns = append(conns, rc)
		off := (uint64(k) * (1 << 20)) % (size - length + 1)
		if _, err := rc.Write(hardReq(false, 0, nbdproto.CmdRead, uint64(k), off, length)); err != nil {
			t.Fatalf("%s: stalled client %d: %v", s.name, k, err)
		}
	}
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	return conns
}

// admGoodReads connects a well-behaved client and times reads of 4 KiB
// spread over the image for about d; it returns the slowest read and
// how long the connection took.
func admGoodReads(t testing.TB, s *admServer, size int64, d time.Duration, want []byte) (slowest, dial time.Duration) {
	t.Helper()
	start := time.Now()
	c, err := nbdclient.Dial(context.Background(), s.uri(), nbdclient.Options{StructuredReplies: true})
	if err != nil {
		t.Fatalf("%s: good client: %v", s.name, err)
	}
	defer c.Close()
	dial = time.Since(start)
	buf := make([]byte, 4096)
	for i := 0; time.Since(start) < d; i++ {
		off := (int64(i) * 7919 * 4096) % size
		t0 := time.Now()
		if _, err := c.ReadAt(buf, off); err != nil {
			t.Fatalf("%s: good read at %d: %v", s.name, off, err)
		}
		slowest = max(slowest, time.Since(t0))
		if want != nil && string(buf) != string(want[off:off+4096]) {
			t.Fatalf("%s: good read at %d: wrong data", s.name, off)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return slowest, dial
}

// TestAdmissionStalledReaders: 64 clients each send one READ of 32 MiB
// and never read the reply, on a plain image (sendfile) and a compressed
// one (read through the engine). A good client's 4 KiB reads must each
// complete in under 100 ms and the server's RSS, sampled continuously,
// stay under 256 MiB. qemu-nbd's figures are logged beside.
func TestAdmissionStalledReaders(t *testing.T) {
	hardRequire(t, "qemu-img", "qemu-io", "qemu-nbd")
	dir := t.TempDir()
	const size = 96 << 20
	raw, plain, zipped := filepath.Join(dir, "a.raw"), filepath.Join(dir, "plain.qcow2"), filepath.Join(dir, "compressed.qcow2")
	// Compressible but varied data: a pattern per MiB.
	script := []string{"-f", "raw"}
	for m := 0; m < size>>20; m++ {
		script = append(script, "-c", fmt.Sprintf("write -q -P %d %d 1M", 1+m%250, m<<20))
	}
	for _, s := range [][]string{
		{"qemu-img", "create", "-q", "-f", "raw", raw, fmt.Sprint(size)},
		append(append([]string{"qemu-io"}, script...), raw),
		{"qemu-img", "convert", "-O", "qcow2", raw, plain},
		{"qemu-img", "convert", "-c", "-O", "qcow2", raw, zipped},
	} {
		if r := hardExec(120*time.Second, s[0], s[1:]...); r.code != 0 {
			t.Fatal(r)
		}
	}
	want, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	const stalled, length = 64, 32 << 20
	for _, img := range []string{plain, zipped} {
		for _, nbdgw := range []bool{true, false} {
			s := admStart(t, nbdgw, "", img)
			t.Run(s.name+"/"+filepath.Base(img), func(t *testing.T) {
				peak := admPeak(s.proc.cmd.Process.Pid)
				conns := admStalled(t, s, stalled, size, length)
				slowest, dial := admGoodReads(t, s, size, 2*time.Second, want)
				rss, hwm := peak()
				t.Logf("FIGURE %s %s: %d stalled clients with a %d MiB read each: good client connected in %v, slowest 4 KiB read %v; server peak VmRSS %d MiB, VmHWM %d MiB",
					s.name, filepath.Base(img), stalled, length>>20, dial.Round(time.Microsecond), slowest.Round(time.Microsecond), rss>>20, hwm>>20)
				for _, c := range conns {
					c.Close()
				}
				if !nbdgw {
					return // the reference: logged, not judged
				}
				if slowest >= 100*time.Millisecond {
					t.Errorf("a good client's 4 KiB read took %v with %d stalled readers (want < 100 ms)", slowest, stalled)
				}
				if hwm >= 256<<20 {
					t.Errorf("server VmHWM %d MiB with %d stalled readers (want < 256 MiB)", hwm>>20, stalled)
				}
			})
			if !nbdgw {
				// qemu-nbd takes seconds to stop after stalled clients;
				// the reference is not judged on that.
				s.proc.cmd.Process.Kill()
			}
			r := s.proc.stop(t)
			if nbdgw {
				hardSane(t, r)
			}
		}
	}
}

// admRaiseNofile raises this process's open-file limit to n if needed.
func admRaiseNofile(t testing.TB, n uint64) {
	t.Helper()
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if lim.Cur >= n {
		return
	}
	lim.Cur = min(n, lim.Max)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil || lim.Cur < n {
		t.Fatalf("RLIMIT_NOFILE: want %d, hard limit %d: %v", n, lim.Max, err)
	}
}

// admIdle opens n TCP connections to addr that never send anything,
// from the loopback addresses 127.0.0.2, 127.0.0.3, ..., perAddr per
// address.
func admIdle(t testing.TB, addr string, n, perAddr int) []net.Conn {
	t.Helper()
	conns := make([]net.Conn, 0, n)
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	for i := 0; i < n; i++ {
		ip := net.IPv4(127, 0, byte(i/perAddr/250), byte(2+i/perAddr%250))
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: ip}, Timeout: 5 * time.Second}
		c, err := d.Dial("tcp", addr)
		if err != nil {
			t.Fatalf("idle connection %d from %v: %v", i, ip, err)
		}
		conns = append(conns, c)
	}
	return conns
}

// admGoodInfo runs nbdinfo --size against uri and returns how long it
// took; the caller judges.
func admGoodInfo(t testing.TB, uri string, timeout time.Duration) (time.Duration, hardResult) {
	t.Helper()
	start := time.Now()
	r := hardExec(timeout, "nbdinfo", "--size", uri)
	return time.Since(start), r
}

// TestAdmissionIdleConnections: 2000 TCP connections that never send a
// byte (from 127.0.0.2... at 50 per address), then a good client from
// 127.0.0.1: it must be served within 11 s. nbdgw accepts them all
// (--max-connections 4096) and drops each at its 10 s handshake timeout;
// beyond the limit connections would wait in the backlog
// (TestHardeningConnectionLimit).
func TestAdmissionIdleConnections(t *testing.T) {
	hardRequire(t, "qemu-img", "qemu-nbd", "nbdinfo")
	admRaiseNofile(t, 8192)
	img := filepath.Join(t.TempDir(), "a.qcow2")
	if r := hardExec(30*time.Second, "qemu-img", "create", "-q", "-f", "qcow2", img, "1M"); r.code != 0 {
		t.Fatal(r)
	}
	const idle = 2000
	for _, nbdgw := range []bool{true, false} {
		s := admStart(t, nbdgw, admFreePort(t), img)
		t.Run(s.name, func(t *testing.T) {
			peak := admPeak(s.proc.cmd.Process.Pid)
			conns := admIdle(t, s.addr, idle, 50)
			took, r := admGoodInfo(t, s.uri(), 30*time.Second)
			rss, hwm := peak()
			t.Logf("FIGURE %s: %d idle connections: a new client (nbdinfo --size) served in %v (exit %d); server peak VmRSS %d MiB, VmHWM %d MiB",
				s.name, idle, took.Round(time.Millisecond), r.code, rss>>20, hwm>>20)
			for _, c := range conns {
				c.Close()
			}
			if !nbdgw {
				return
			}
			if r.code != 0 || took > 11*time.Second {
				t.Errorf("with %d idle connections a new client took %v: %s", idle, took, r)
			}
		})
		r := s.proc.stop(t)
		if nbdgw {
			hardSane(t, r)
		}
	}
}

// TestAdmissionHandshakenIdle: 256 clients that finished the handshake
// and then idle do not lock out a new one.
func TestAdmissionHandshakenIdle(t *testing.T) {
	hardRequire(t, "qemu-img", "nbdinfo")
	admRaiseNofile(t, 4096)
	img := filepath.Join(t.TempDir(), "a.qcow2")
	if r := hardExec(30*time.Second, "qemu-img", "create", "-q", "-f", "qcow2", img, "1M"); r.code != 0 {
		t.Fatal(r)
	}
	s := admStart(t, true, admFreePort(t), img)
	const n = 256
	// In batches of 32: from one address at most --max-per-address (64)
	// handshakes run at once.
	conns := make([]*hardRawConn, n)
	errs := make([]error, n)
	for b := 0; b < n; b += 32 {
		var wg sync.WaitGroup
		for i := b; i < b+32; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				conns[i], errs[i] = hardHandshake("tcp", s.addr, nbdproto.OptStructuredReply)
			}()
		}
		wg.Wait()
	}
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	}()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("handshaken client %d: %v", i, err)
		}
	}
	took, r := admGoodInfo(t, s.uri(), 20*time.Second)
	t.Logf("FIGURE nbdgw: %d handshaken idle clients: a new client served in %v", n, took.Round(time.Millisecond))
	if r.code != 0 || took > 2*time.Second {
		t.Errorf("with %d handshaken idle clients a new client took %v: %s", n, took, r)
	}
	// The idle ones are still served.
	for i, c := range conns[:4] {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write(hardReq(false, 0, nbdproto.CmdRead, 1, 0, 4096)); err != nil {
			t.Fatalf("idle client %d: %v", i, err)
		}
		if ch, err := c.chunk(); err != nil || ch.typ == hardReplySimple {
			t.Errorf("idle client %d: read: %+v %v", i, ch.typ, err)
		}
	}
	hardSane(t, s.proc.stop(t))
}

// TestAdmissionPerAddress: over --max-per-address handshakes from one
// address, more connections from it are closed at once (and logged),
// while another address is served; a handshake that finishes frees its
// place. --handshake-timeout drops the silent ones.
func TestAdmissionPerAddress(t *testing.T) {
	hardRequire(t, "qemu-img", "nbdinfo")
	img := filepath.Join(t.TempDir(), "a.qcow2")
	if r := hardExec(30*time.Second, "qemu-img", "create", "-q", "-f", "qcow2", img, "1M"); r.code != 0 {
		t.Fatal(r)
	}
	s := admStart(t, true, admFreePort(t), img, "--max-per-address", "4", "--handshake-timeout", "2s")
	// The readiness probe came from 127.0.0.1: use another address.
	idle := admIdle(t, s.addr, 4, 4) // 127.0.0.2
	time.Sleep(200 * time.Millisecond)
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}}
	c, err := d.Dial("tcp", s.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if b, err := io.ReadAll(c); len(b) != 0 || err != nil {
		t.Errorf("5th handshake from 127.0.0.2 over --max-per-address 4: read %d bytes, %v; want the connection closed", len(b), err)
	}
	if took, r := admGoodInfo(t, s.uri(), 10*time.Second); r.code != 0 || took > time.Second {
		t.Errorf("a client from 127.0.0.1 while 127.0.0.2 is at its limit: %v %s", took, r)
	}
	// The silent ones are dropped at the handshake timeout.
	start := time.Now()
	idle[0].SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err = io.ReadAll(idle[0])
	if took := time.Since(start); err != nil || took > 4*time.Second {
		t.Errorf("a silent connection with --handshake-timeout 2s: closed after %v, %v", took, err)
	}
	r := s.proc.stop(t)
	hardSane(t, r)
	if !strings.Contains(string(r.stderr), "already in the handshake") {
		t.Errorf("the refusal was not logged:\n%s", hardClip(r.stderr))
	}
}

// TestServeStringBounds: export names and descriptions over 4096 bytes
// are refused at start, as qemu-nbd refuses them; 4096 bytes are served
// and listed.
func TestServeStringBounds(t *testing.T) {
	hardRequire(t, "qemu-img", "qemu-nbd", "nbdinfo")
	bin := nbdgwBinary(t)
	img := filepath.Join(t.TempDir(), "a.qcow2")
	if r := hardExec(30*time.Second, "qemu-img", "create", "-q", "-f", "qcow2", img, "1M"); r.code != 0 {
		t.Fatal(r)
	}
	long := strings.Repeat("n", 5000)
	for _, c := range []struct{ nbdgw, qemu, what string }{
		{"--export-name", "-x", "export name"},
		{"--description", "-D", "export description"},
	} {
		q := hardExec(10*time.Second, "qemu-nbd", "-r", "-k", filepath.Join(t.TempDir(), "q"), c.qemu, long, img)
		r := hardExec(10*time.Second, bin, "serve", "--socket", filepath.Join(t.TempDir(), "s"), c.nbdgw, long, img)
		if q.code == 0 || !strings.Contains(string(q.stderr), "too long") {
			t.Errorf("qemu-nbd %s of 5000 bytes: %s", c.qemu, q)
		}
		if r.code != 1 || !strings.Contains(string(r.stderr), c.what) || !strings.Contains(string(r.stderr), "too long") ||
			strings.Count(strings.TrimSpace(string(r.stderr)), "\n") != 0 {
			t.Errorf("nbdgw serve %s of 5000 bytes: want exit 1 and one line naming %q ... too long: %s", c.nbdgw, c.what, r)
		}
	}
	name := strings.Repeat("e", 4096)
	s := admStart(t, true, "", img, "--export-name", name, "--description", strings.Repeat("d", 4096))
	r := hardExec(10*time.Second, "nbdinfo", "--list", "--json", s.uri())
	if r.code != 0 || !strings.Contains(string(r.stdout), name) {
		t.Errorf("nbdinfo --list of a 4096-byte export name: %s", r)
	}
}
