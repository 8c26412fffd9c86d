package integration

// Helpers shared by the hardening, load and forensic tests: running the
// nbdgw binary with a deadline and a memory figure, serving and mounting
// it as a child process, and a raw NBD wire encoder for hostile clients.
// Everything here is prefixed "hard" so it never collides with the other
// test files of this package.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nbdgw/nbdgw/internal/hostile"
	"github.com/nbdgw/nbdgw/nbdserver/nbdclient"
	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
)

// hardStartWait bounds how long serve and mount may take to be ready
// (they take milliseconds; a hang must not cost much).
const hardStartWait = 10 * time.Second

// hardMaxRSS is the memory bound every nbdgw process must stay under
// (maximum resident set size, from getrusage of the reaped child).
const hardMaxRSS = 300 << 20

// hardRequire skips unless every tool is installed, /usr/bin/time (the
// memory figure of hardExec) included. scripts/test.sh fails on the skip.
func hardRequire(t testing.TB, tools ...string) {
	t.Helper()
	for _, tool := range append([]string{"/usr/bin/time"}, tools...) {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed: %v", tool, err)
		}
	}
}

// hardResult is one finished process.
type hardResult struct {
	args     []string
	stdout   []byte
	stderr   []byte
	code     int   // exit status; -1 if killed
	rss      int64 // maximum resident set size in bytes
	timedOut bool
	elapsed  time.Duration
}

func (r hardResult) String() string {
	return fmt.Sprintf("%q: exit %d, rss %d MiB, %v, timed out %v\nstderr: %s", r.args, r.code, r.rss>>20, r.elapsed.Round(time.Millisecond), r.timedOut, hardClip(r.stderr))
}

func hardClip(b []byte) string {
	if len(b) > 2000 {
		return string(b[:2000]) + "..."
	}
	return string(b)
}

// hardTime is GNU time, used to measure a child's own peak memory: the
// rusage of a child started by Go (vfork) also counts the parent's
// resident set at the time of exec.
var hardTime = func() string {
	p, _ := exec.LookPath("/usr/bin/time")
	return p
}()

// hardExec runs name args with a deadline and reports its status, output
// and peak memory, measured by /usr/bin/time: without it (or without a
// figure from it) the result is a failure, exit -1.
//
// The output goes to files, not pipes: Wait then returns when the process
// exits, with nothing left to drain. With pipes, Wait also waits for Go's
// copying goroutines, and the WaitDelay that bounds that wait (needed in
// case a descendant keeps a pipe open) turned a successful 64 MiB nbdcopy
// into exit -1 whenever a loaded machine did not drain the pipe in time.
func hardExec(timeout time.Duration, name string, args ...string) hardResult {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	argv := append([]string{name}, args...)
	r := hardResult{args: append([]string{filepath.Base(name)}, args...)}
	if hardTime == "" {
		// Without it every memory check would read 0 and pass.
		r.code, r.stderr = -1, []byte("/usr/bin/time is not installed (scripts/install-deps.sh installs it): no memory figure")
		return r
	}
	files := make([]*os.File, 3) // stdout, stderr, /usr/bin/time's figure
	for i := range files {
		f, err := os.CreateTemp("", "hexec")
		if err != nil {
			r.code, r.stderr = -1, []byte(err.Error())
			return r
		}
		defer os.Remove(f.Name())
		defer f.Close()
		files[i] = f
	}
	argv = append([]string{hardTime, "-f", "%M", "-o", files[2].Name(), "--"}, argv...)
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = files[0], files[1]
	// On timeout kill the whole process group: killing /usr/bin/time
	// alone would leave a hung nbdgw behind.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	start := time.Now()
	err := cmd.Run()
	r.elapsed = time.Since(start)
	r.timedOut = ctx.Err() != nil
	r.code = -1
	if cmd.ProcessState != nil {
		r.code = cmd.ProcessState.ExitCode()
	}
	if err != nil && r.code == 0 {
		r.code = -1
	}
	r.stdout, _ = os.ReadFile(files[0].Name())
	r.stderr, _ = os.ReadFile(files[1].Name())
	if err != nil && cmd.ProcessState == nil {
		r.stderr = append(r.stderr, err.Error()...)
	}
	// The last word is the figure; a line before it may say the command
	// exited with a non-zero status.
	b, _ := os.ReadFile(files[2].Name())
	if w := strings.Fields(string(b)); len(w) > 0 {
		kb, _ := strconv.ParseInt(w[len(w)-1], 10, 64)
		r.rss = kb << 10
	}
	if r.rss == 0 && !r.timedOut {
		r.code = -1
		r.stderr = append(r.stderr, fmt.Sprintf("\n/usr/bin/time gave no memory figure: %q", b)...)
	}
	return r
}

// hardSane fails t if a process panicked, hung or used too much memory.
func hardSane(t testing.TB, r hardResult) {
	t.Helper()
	hardSaneLimit(t, r, hardMaxRSS)
}

// hardSaneLimit is hardSane with another memory limit.
func hardSaneLimit(t testing.TB, r hardResult, limit int64) {
	t.Helper()
	if bytes.Contains(r.stderr, []byte("panic:")) || bytes.Contains(r.stderr, []byte("goroutine ")) {
		t.Errorf("PANIC in %s", r)
	}
	if r.timedOut {
		t.Errorf("HANG: %s", r)
	}
	if r.rss > limit {
		t.Errorf("MEMORY: %s (limit %d MiB)", r, limit>>20)
	}
}

// hardMentions fails t unless msg contains every want (case-insensitive).
func hardMentions(t testing.TB, what string, msg []byte, want []string) {
	t.Helper()
	low := strings.ToLower(string(msg))
	for _, w := range want {
		if !strings.Contains(low, strings.ToLower(w)) {
			t.Errorf("%s: error does not mention %q:\n%s", what, w, hardClip(msg))
		}
	}
}

// hardProc is a long-running nbdgw (serve or mount).
type hardProc struct {
	cmd    *exec.Cmd
	stderr *lockedBuffer
	exited chan struct{}
	err    error
	state  *os.ProcessState
}

func hardStart(t testing.TB, bin string, args ...string) *hardProc {
	t.Helper()
	p := &hardProc{stderr: &lockedBuffer{}, exited: make(chan struct{})}
	p.cmd = exec.Command(bin, args...)
	p.cmd.Stderr = p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.err = p.cmd.Wait()
		p.state = p.cmd.ProcessState
		close(p.exited)
	}()
	return p
}

// stop sends SIGTERM and waits (SIGKILL after 10 s, reported as a hang).
func (p *hardProc) stop(t testing.TB) hardResult {
	t.Helper()
	r := hardResult{args: p.cmd.Args}
	select {
	case <-p.exited:
	default:
		// The peak so far (a process that exited on its own is not
		// measured: the rusage of a vforked child is the parent's).
		_, r.rss = hardProcRSS(p.cmd.Process.Pid)
		p.cmd.Process.Signal(syscall.SIGTERM)
	}
	select {
	case <-p.exited:
	case <-time.After(10 * time.Second):
		r.timedOut = true
		p.cmd.Process.Kill()
		<-p.exited
	}
	r.stderr = p.stderr.Bytes()
	r.code = p.state.ExitCode()
	return r
}

// hardServeProc is a running `nbdgw serve --socket`.
type hardServeProc struct {
	*hardProc
	socket, uri string
}

// hardServe starts nbdgw serve on a unix socket in a new temporary
// directory and waits until it accepts connections. If the process exits
// first, it returns nil and the result.
func hardServe(t testing.TB, bin string, args ...string) (*hardServeProc, hardResult) {
	t.Helper()
	dir, err := os.MkdirTemp("", "hsrv")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "s")
	p := hardStart(t, bin, append([]string{"serve", "--socket", sock}, args...)...)
	s := &hardServeProc{hardProc: p, socket: sock, uri: "nbd+unix:///?socket=" + sock}
	t.Cleanup(func() { s.stop(t) })
	deadline := time.Now().Add(hardStartWait)
	for {
		select {
		case <-p.exited:
			return nil, s.stop(t)
		default:
		}
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return s, hardResult{}
		}
		if time.Now().After(deadline) {
			r := s.stop(t)
			r.timedOut = true
			return nil, r
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// hardMountProc is a running `nbdgw mount`.
type hardMountProc struct {
	*hardProc
	dir string
}

func hardMounted(dir string) bool {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return false
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if fields := strings.Fields(s.Text()); len(fields) > 4 && fields[4] == dir {
			return true
		}
	}
	return false
}

// hardFUSE reports why FUSE mounts cannot be made here, or "".
func hardFUSE() string {
	if _, err := os.Stat("/dev/fuse"); err != nil {
		return "no /dev/fuse"
	}
	if _, err := exec.LookPath("fusermount3"); err != nil {
		return "fusermount3 not installed"
	}
	return ""
}

// hardMount runs nbdgw mount IMAGE DIR and waits for the mount. If the
// process exits first, it returns nil and the result.
func hardMount(t testing.TB, bin string, args ...string) (*hardMountProc, hardResult) {
	t.Helper()
	base, err := os.MkdirTemp("", "hmnt")
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(base, "m")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	p := hardStart(t, bin, append(append([]string{"mount"}, args...), dir)...)
	m := &hardMountProc{hardProc: p, dir: dir}
	t.Cleanup(func() {
		m.stop(t)
		if hardMounted(dir) {
			exec.Command("fusermount3", "-u", "-z", dir).Run()
		}
		os.RemoveAll(base)
	})
	deadline := time.Now().Add(hardStartWait)
	for !hardMounted(dir) {
		select {
		case <-p.exited:
			return nil, m.stop(t)
		default:
		}
		if time.Now().After(deadline) {
			r := m.stop(t)
			r.timedOut = true
			return nil, r
		}
		time.Sleep(10 * time.Millisecond)
	}
	return m, hardResult{}
}

// stop unmounts with SIGTERM (fusermount3 -u -z if that hangs).
func (m *hardMountProc) stop(t testing.TB) hardResult {
	t.Helper()
	select {
	case <-m.exited:
	default:
		m.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-m.exited:
		case <-time.After(10 * time.Second):
			exec.Command("fusermount3", "-u", "-z", m.dir).Run()
		}
	}
	return m.hardProc.stop(t)
}

// hardReadFile reads a file with a deadline: a read that blocks in FUSE
// must not hang the test.
func hardReadFile(path string, timeout time.Duration) ([]byte, error) {
	type res struct {
		b   []byte
		err error
	}
	ch := make(chan res, 1)
	go func() {
		b, err := os.ReadFile(path)
		ch <- res{b, err}
	}()
	select {
	case r := <-ch:
		return r.b, r.err
	case <-time.After(timeout):
		return nil, fmt.Errorf("HANG: reading %s took more than %v", path, timeout)
	}
}

// hardQemuRaw converts image to raw with qemu-img and returns the bytes.
func hardQemuRaw(t testing.TB, image string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "qemu.raw")
	r := hardExec(60*time.Second, "qemu-img", "convert", "-O", "raw", image, out)
	if r.code != 0 {
		t.Fatalf("qemu-img convert: %s", r)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// hardPIDFiles lists the files process pid holds open with their
// open(2) flags, from /proc/PID/fd and /proc/PID/fdinfo.
func hardPIDFiles(pid int) (map[string][]uint64, error) {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	fds, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	out := map[string][]uint64{}
	for _, fd := range fds {
		target, err := os.Readlink(filepath.Join(dir, fd.Name()))
		if err != nil {
			continue
		}
		info, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%s", pid, fd.Name()))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(info), "\n") {
			if v, ok := strings.CutPrefix(line, "flags:"); ok {
				if f, err := strconv.ParseUint(strings.TrimSpace(v), 8, 64); err == nil {
					out[target] = append(out[target], f)
				}
			}
		}
	}
	return out, nil
}

// --- raw NBD wire (nbd-proto.md), for clients that misbehave on purpose ---

// hardReplySimple is not on the wire: see hardRawConn.chunk.
const hardReplySimple nbdproto.ReplyType = 0xffff

var hardBE = binary.BigEndian

// The encoders are package hostile's.
var (
	hardOpt      = hostile.Opt
	hardReq      = hostile.Req
	hardGoData   = hostile.GoData
	hardMetaData = hostile.MetaData
)

// hardRawConn is a hand-driven NBD connection.
type hardRawConn struct {
	net.Conn
	r *bufio.Reader
}

// hardDialRaw connects and reads the server greeting.
func hardDialRaw(network, addr string) (*hardRawConn, error) {
	c, err := net.DialTimeout(network, addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	rc := &hardRawConn{Conn: c, r: bufio.NewReader(c)}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	var hello [18]byte
	if _, err := io.ReadFull(rc.r, hello[:]); err != nil {
		c.Close()
		return nil, fmt.Errorf("greeting: %w", err)
	}
	if hardBE.Uint64(hello[:]) != nbdproto.NBDMagic || hardBE.Uint64(hello[8:]) != nbdproto.OptsMagic {
		c.Close()
		return nil, errors.New("bad greeting")
	}
	c.SetDeadline(time.Time{})
	return rc, nil
}

// optReply reads one option reply: type and data (at most 64 KiB).
func (rc *hardRawConn) optReply() (nbdproto.Reply, []byte, error) {
	var h [20]byte
	if _, err := io.ReadFull(rc.r, h[:]); err != nil {
		return 0, nil, err
	}
	if hardBE.Uint64(h[:]) != nbdproto.RepMagic {
		return 0, nil, errors.New("bad option reply magic")
	}
	n := hardBE.Uint32(h[16:])
	if n > 64<<10 {
		return 0, nil, fmt.Errorf("option reply of %d bytes", n)
	}
	d := make([]byte, n)
	_, err := io.ReadFull(rc.r, d)
	return nbdproto.Reply(hardBE.Uint32(h[12:])), d, err
}

// finalReply reads option replies up to the first that is not
// NBD_REP_INFO/NBD_REP_META_CONTEXT/NBD_REP_SERVER and returns its type.
func (rc *hardRawConn) finalReply() (nbdproto.Reply, error) {
	for {
		typ, _, err := rc.optReply()
		if err != nil {
			return 0, err
		}
		if typ != nbdproto.RepServer && typ != nbdproto.RepInfo && typ != nbdproto.RepMetaContext {
			return typ, nil
		}
	}
}

// hardHandshake negotiates (fixed newstyle, no zeroes), optionally
// structured replies or extended headers and meta contexts, then GO.
func hardHandshake(network, addr string, mode nbdproto.Option, contexts ...string) (*hardRawConn, error) {
	rc, err := hardDialRaw(network, addr)
	if err != nil {
		return nil, err
	}
	rc.SetDeadline(time.Now().Add(10 * time.Second))
	defer rc.SetDeadline(time.Time{})
	b := hardBE.AppendUint32(nil, nbdproto.ClientFixedNewstyle|nbdproto.ClientNoZeroes)
	if mode != 0 {
		b = append(b, hardOpt(mode, nil)...)
	}
	if len(contexts) > 0 {
		b = append(b, hardOpt(nbdproto.OptSetMetaContext, hardMetaData(contexts...))...)
	}
	b = append(b, hardOpt(nbdproto.OptGo, hardGoData())...)
	if _, err := rc.Write(b); err != nil {
		rc.Close()
		return nil, err
	}
	n := 1
	if mode != 0 {
		n++
	}
	if len(contexts) > 0 {
		n++
	}
	for i := 0; i < n; i++ {
		typ, err := rc.finalReply()
		if err != nil || typ != nbdproto.RepAck {
			rc.Close()
			return nil, fmt.Errorf("handshake option %d: reply %#x, %v", i, typ, err)
		}
	}
	return rc, nil
}

// simpleReply reads a simple reply header (and length payload bytes if
// the reply is a success): errno and payload.
func (rc *hardRawConn) simpleReply(length int) (nbdproto.Errno, uint64, []byte, error) {
	var h [16]byte
	if _, err := io.ReadFull(rc.r, h[:]); err != nil {
		return 0, 0, nil, err
	}
	if hardBE.Uint32(h[:]) != nbdproto.SimpleReplyMagic {
		return 0, 0, nil, fmt.Errorf("reply magic %#x, want a simple reply", hardBE.Uint32(h[:]))
	}
	errno, cookie := nbdproto.Errno(hardBE.Uint32(h[4:])), hardBE.Uint64(h[8:])
	if errno != 0 {
		return errno, cookie, nil, nil
	}
	p := make([]byte, length)
	_, err := io.ReadFull(rc.r, p)
	return 0, cookie, p, err
}

// hardChunk is one structured reply chunk.
type hardChunk struct {
	flags   uint16
	typ     nbdproto.ReplyType
	cookie  uint64
	payload []byte
}

// chunk reads one structured (non-extended) reply chunk, payload at most
// 64 MiB. A simple reply (allowed for commands without payload even
// after structured replies are negotiated) comes back as a chunk of type
// hardReplySimple with the errno as its payload and the done flag set.
func (rc *hardRawConn) chunk() (hardChunk, error) {
	var h [20]byte
	if _, err := io.ReadFull(rc.r, h[:4]); err != nil {
		return hardChunk{}, err
	}
	if hardBE.Uint32(h[:]) == nbdproto.SimpleReplyMagic {
		if _, err := io.ReadFull(rc.r, h[4:16]); err != nil {
			return hardChunk{}, err
		}
		return hardChunk{flags: nbdproto.ReplyFlagDone, typ: hardReplySimple, cookie: hardBE.Uint64(h[8:]), payload: h[4:8]}, nil
	}
	if hardBE.Uint32(h[:]) != nbdproto.StructuredReplyMagic {
		return hardChunk{}, fmt.Errorf("chunk magic %#x", hardBE.Uint32(h[:]))
	}
	if _, err := io.ReadFull(rc.r, h[4:]); err != nil {
		return hardChunk{}, err
	}
	c := hardChunk{flags: hardBE.Uint16(h[4:]), typ: nbdproto.ReplyType(hardBE.Uint16(h[6:])), cookie: hardBE.Uint64(h[8:])}
	n := hardBE.Uint32(h[16:])
	if n > 64<<20 {
		return c, fmt.Errorf("chunk of %d bytes", n)
	}
	c.payload = make([]byte, n)
	_, err := io.ReadFull(rc.r, c.payload)
	return c, err
}

// hardProcRSS reads the current and peak resident set size of pid.
func hardProcRSS(pid int) (rss, hwm int64) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return -1, -1
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		v, _ := strconv.ParseInt(f[1], 10, 64)
		switch f[0] {
		case "VmRSS:":
			rss = v << 10
		case "VmHWM:":
			hwm = v << 10
		}
	}
	return rss, hwm
}

// hardPeakRSS samples the resident set of pid every 10 ms until it has not
// grown for settle (at most for limit) and returns the largest sample. One
// sample after a fixed sleep reads too early on a loaded machine (the
// server has not allocated yet) and so passes whatever the product does.
func hardPeakRSS(pid int, settle, limit time.Duration) int64 {
	var peak int64
	start := time.Now()
	grew := start
	for time.Since(start) < limit && time.Since(grew) < settle {
		if rss, _ := hardProcRSS(pid); rss > peak {
			peak, grew = rss, time.Now()
		}
		time.Sleep(10 * time.Millisecond)
	}
	return peak
}

// hardGoodClient reads and maps random ranges through the Go client
// until stop is closed or max requests are done, verifying every answer against the oracle. It
// returns the number of requests and the first error.
func hardGoodClient(uri string, opts nbdclient.Options, o *hardOracle, seed uint64, stop <-chan struct{}, max int) (int, error) {
	ctx := context.Background()
	c, err := nbdclient.Dial(ctx, uri, opts)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	rng := rand.New(rand.NewPCG(seed, 99))
	size := int64(len(o.data))
	buf := make([]byte, 1<<20)
	n := 0
	for n < max {
		select {
		case <-stop:
			return n, nil
		default:
		}
		if err := hardMixedRequest(ctx, c, o, rng, size, buf, opts.MetaContexts); err != nil {
			return n, err
		}
		n++
	}
	return n, nil
}

// hardMixedRequest sends one random request: a read of up to len(buf)
// bytes at any byte offset, or block status of a random range on one of
// the contexts, and checks the answer against the oracle.
func hardMixedRequest(ctx context.Context, c *nbdclient.Client, o *hardOracle, rng *rand.Rand, size int64, buf []byte, contexts []string) error {
	if len(contexts) == 0 || rng.IntN(2) == 0 {
		n := 1 + rng.Int64N(int64(len(buf)))
		off := rng.Int64N(size - n + 1)
		if rng.IntN(2) == 0 {
			off &^= 4095
		}
		return hardCheckedRead(c, o, off, buf[:n])
	}
	name := contexts[rng.IntN(len(contexts))]
	off := rng.Int64N(size)
	return hardCheckedStatus(ctx, c, o, name, off, 1+rng.Int64N(size-off))
}

// hardCheckedRead reads len(p) bytes at off and compares them with the
// oracle.
func hardCheckedRead(c *nbdclient.Client, o *hardOracle, off int64, p []byte) error {
	n := int64(len(p))
	if _, err := c.ReadAt(p, off); err != nil {
		return fmt.Errorf("read %d at %d: %w", n, off, err)
	}
	if !bytes.Equal(p, o.data[off:off+n]) {
		return fmt.Errorf("read %d at %d: WRONG DATA", n, off)
	}
	return nil
}

// hardCheckedStatus asks block status of [off, off+n) on context name
// and checks every extent against the oracle's map.
func hardCheckedStatus(ctx context.Context, c *nbdclient.Client, o *hardOracle, name string, off, n int64) error {
	m := o.maps[name]
	next := off
	err := c.BlockStatus(ctx, name, off, n, func(eo, en int64, flags uint32) error {
		if eo != next || en <= 0 {
			return fmt.Errorf("extent at %d+%d, want one at %d", eo, en, next)
		}
		next = eo + en
		return m.check(eo, min(en, off+n-eo), flags)
	})
	if err != nil {
		return fmt.Errorf("block status %s %d+%d: %w", name, off, n, err)
	}
	if next < off+n {
		return fmt.Errorf("block status %s %d+%d: answered up to %d", name, off, n, next)
	}
	return nil
}

// hardChain builds a two-layer qcow2 chain of 64 MiB with random and
// patterned data, compressed and zero clusters, a discarded range, and a
// persistent dirty bitmap b0 in the top layer. It returns the top and
// every file of the chain.
func hardChain(t testing.TB, dir string) (string, []string) {
	t.Helper()
	rnd := make([]byte, 4<<20)
	rng := rand.New(rand.NewPCG(7, 11))
	for i := range rnd {
		rnd[i] = byte(rng.Uint32())
	}
	src := filepath.Join(dir, "rnd.bin")
	if err := os.WriteFile(src, rnd, 0o644); err != nil {
		t.Fatal(err)
	}
	base, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	steps := [][]string{
		{"qemu-img", "create", "-q", "-f", "qcow2", base, "64M"},
		{"qemu-io", "-f", "qcow2", "-c", "write -q -s " + src + " 0 4M", "-c", "write -q -c -P 0x12 8M 1M",
			"-c", "write -q -z 12M 1M", "-c", "write -q -s " + src + " 20M 4M", "-c", "write -q -P 0x14 40M 3M", base},
		{"qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, "64M"},
		{"qemu-img", "bitmap", "--add", top, "b0"},
		{"qemu-io", "-f", "qcow2", "-c", "write -q -s " + src + " 1M 1M", "-c", "write -q -z 2560k 512k",
			"-c", "write -q -c -P 0x22 12M 128k", "-c", "write -q -s " + src + " 30M 2M", "-c", "discard -q 41M 1M",
			"-c", "write -q -P 0x24 63M 1M", top},
	}
	for _, s := range steps {
		if r := hardExec(60*time.Second, s[0], s[1:]...); r.code != 0 {
			t.Fatal(r)
		}
	}
	os.Remove(src)
	return top, []string{top, base}
}

// hardExtent is one line of nbdinfo --map.
type hardExtent struct {
	off, length int64
	flags       uint32
}

// hardMap is a context's whole-image map, sorted and contiguous.
type hardMap []hardExtent

// at returns the extent holding pos.
func (m hardMap) at(pos int64) (hardExtent, bool) {
	i := sort.Search(len(m), func(i int) bool { return m[i].off+m[i].length > pos })
	if i == len(m) || m[i].off > pos {
		return hardExtent{}, false
	}
	return m[i], true
}

// check verifies that an answered extent [off, off+n) with flags agrees
// with the map over its whole length.
func (m hardMap) check(off, n int64, flags uint32) error {
	for p := off; p < off+n; {
		e, ok := m.at(p)
		if !ok {
			return fmt.Errorf("extent at %d beyond the map", p)
		}
		if e.flags != flags {
			return fmt.Errorf("extent [%d, +%d) flags %d, oracle says %d at %d", off, n, flags, e.flags, p)
		}
		p = e.off + e.length
	}
	return nil
}

func hardParseMap(out []byte) (hardMap, error) {
	var m hardMap
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(line)
		if len(f) < 3 {
			return nil, fmt.Errorf("map line %q", line)
		}
		off, err1 := strconv.ParseInt(f[0], 10, 64)
		n, err2 := strconv.ParseInt(f[1], 10, 64)
		fl, err3 := strconv.ParseUint(f[2], 10, 32)
		if err := errors.Join(err1, err2, err3); err != nil {
			return nil, fmt.Errorf("map line %q: %v", line, err)
		}
		if k := len(m) - 1; k >= 0 && m[k].flags == uint32(fl) && m[k].off+m[k].length == off {
			m[k].length += n
			continue
		}
		m = append(m, hardExtent{off, n, uint32(fl)})
	}
	return m, nil
}

// hardOracle is what QEMU says about an image: its content (qemu-img
// convert) and, from qemu-nbd -A -B NAME read with nbdinfo --map, the
// maps of base:allocation, qemu:allocation-depth and each bitmap;
// qemu:joint-allocation (not in QEMU) is derived from the first two by
// its definition (HOLE and ZERO, LOCAL at depth 1, BACKING below).
type hardOracle struct {
	data []byte
	maps map[string]hardMap
}

func hardQemuOracle(t testing.TB, image string, bitmaps ...string) *hardOracle {
	t.Helper()
	hardRequire(t, "qemu-img", "qemu-nbd", "nbdinfo")
	o := &hardOracle{data: hardQemuRaw(t, image), maps: map[string]hardMap{}}
	dir, err := os.MkdirTemp("", "hqnbd")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "q")
	args := []string{"-r", "-t", "-f", "qcow2", "-k", sock, "-A"}
	for _, b := range bitmaps {
		args = append(args, "-B", b)
	}
	p := hardStart(t, "qemu-nbd", append(args, image)...)
	defer p.stop(t)
	for i := 0; ; i++ {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
		if i > 1000 {
			t.Fatalf("qemu-nbd did not start: %s", p.stderr.Bytes())
		}
		time.Sleep(10 * time.Millisecond)
	}
	ctxs := []string{"base:allocation", "qemu:allocation-depth"}
	for _, b := range bitmaps {
		ctxs = append(ctxs, "qemu:dirty-bitmap:"+b)
	}
	for _, c := range ctxs {
		r := hardExec(60*time.Second, "nbdinfo", "--map="+c, "nbd+unix:///?socket="+sock)
		if r.code != 0 {
			t.Fatalf("oracle: %s", r)
		}
		m, err := hardParseMap(r.stdout)
		if err != nil {
			t.Fatal(err)
		}
		o.maps[c] = m
	}
	// Joint allocation, by its definition.
	var joint hardMap
	base, depth := o.maps["base:allocation"], o.maps["qemu:allocation-depth"]
	for p := int64(0); p < int64(len(o.data)); {
		b, ok1 := base.at(p)
		d, ok2 := depth.at(p)
		if !ok1 || !ok2 {
			t.Fatalf("oracle maps do not cover %d", p)
		}
		end := min(b.off+b.length, d.off+d.length)
		f := b.flags & 3
		switch {
		case d.flags == 1:
			f |= 4
		case d.flags >= 2:
			f |= 8
		}
		if k := len(joint) - 1; k >= 0 && joint[k].flags == f {
			joint[k].length += end - p
		} else {
			joint = append(joint, hardExtent{p, end - p, f})
		}
		p = end
	}
	o.maps["qemu:joint-allocation"] = joint
	return o
}
