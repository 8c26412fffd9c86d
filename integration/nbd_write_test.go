package integration

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"

	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nbdgw/nbdgw/nbdserver/nbdclient"
	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
)

// TestNBDWritable drives `nbdgw serve --writable` (a subprocess on a unix
// socket) with the Go client and real NBD clients, and checks every
// result with QEMU's tools reading the image file.
func TestNBDWritable(t *testing.T) {
	nbdRequire(t)
	bin := nbdgwBinary(t)
	t.Run("random", func(t *testing.T) {
		for _, kind := range []string{"backing", "raw-backing", "compressed", "extended-l2"} {
			t.Run(kind, func(t *testing.T) { nbdWriteRandom(t, bin, kind) })
		}
	})
	t.Run("kill-9", func(t *testing.T) { nbdWriteCrash(t, bin) })
	t.Run("sigterm under load", func(t *testing.T) { nbdWriteSigterm(t, bin) })
	t.Run("qemu-io and nbdcopy", func(t *testing.T) { nbdWriteRealClients(t, bin) })
	t.Run("qemu-io random load", func(t *testing.T) {
		for _, kind := range []string{"backing", "compressed", "extended-l2"} {
			t.Run(kind, func(t *testing.T) { nbdWriteQemuIOLoad(t, bin, kind) })
		}
	})
	t.Run("fio verify", func(t *testing.T) { nbdWriteFio(t, bin) })
	t.Run("snapshot", func(t *testing.T) { nbdWriteSnapshot(t, bin) })
	t.Run("refusals", func(t *testing.T) { nbdWriteRefusals(t, bin) })
	t.Run("forensic default", func(t *testing.T) { nbdWriteForensic(t, bin) })
}

// nbdServer is a running `nbdgw serve`.
type nbdServer struct {
	cmd    *exec.Cmd
	sock   string
	stderr *lockedBuffer
	done   chan error
}

// nbdServe starts `nbdgw serve --socket SOCK args...` and waits until it
// listens. At cleanup a server still running is killed.
func nbdServe(t *testing.T, bin string, args ...string) *nbdServer {
	t.Helper()
	s := &nbdServer{sock: filepath.Join(t.TempDir(), "nbd.sock"), stderr: new(lockedBuffer), done: make(chan error, 1)}
	s.cmd = exec.Command(bin, append([]string{"serve", "--socket", s.sock}, args...)...)
	s.cmd.Stderr = s.stderr
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { s.done <- s.cmd.Wait() }()
	t.Cleanup(func() {
		if s.cmd.ProcessState == nil {
			s.cmd.Process.Kill()
			<-s.done
		}
	})
	for range 200 {
		// Listening, not merely bound: a unix socket's file appears
		// before listen(2), and a connect then is refused.
		if c, err := net.Dial("unix", s.sock); err == nil {
			c.Close()
			return s
		}
		select {
		case err := <-s.done:
			t.Fatalf("nbdgw serve %q exited: %v\n%s", args, err, s.stderr)
		case <-time.After(25 * time.Millisecond):
		}
	}
	t.Fatalf("nbdgw serve %q does not listen\n%s", args, s.stderr)
	return nil
}

// stop sends SIGTERM and requires a clean exit.
func (s *nbdServer) stop(t *testing.T) {
	t.Helper()
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-s.done:
		if err != nil {
			t.Fatalf("nbdgw serve after SIGTERM: %v\n%s", err, s.stderr)
		}
	case <-time.After(30 * time.Second):
		s.cmd.Process.Kill()
		t.Fatalf("nbdgw serve did not stop after SIGTERM\n%s", s.stderr)
	}
}

// kill sends SIGKILL and waits for the process to go.
func (s *nbdServer) kill() {
	s.cmd.Process.Kill()
	<-s.done
}

func (s *nbdServer) uri() string { return nbdURI(s.sock) }

func (s *nbdServer) dial(t *testing.T, opts nbdclient.Options) *nbdclient.Client {
	t.Helper()
	c, err := nbdclient.Dial(context.Background(), s.uri(), opts)
	if err != nil {
		t.Fatalf("dial %s: %v\n%s", s.uri(), err, s.stderr)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// nbdWriteImage is fuseWriteImage plus a qcow2 over a raw backing file.
func nbdWriteImage(t *testing.T, dir, kind string) (string, []string) {
	if kind != "raw-backing" {
		return fuseWriteImage(t, dir, kind)
	}
	base := filepath.Join(dir, "base.raw")
	runOutput(t, "qemu-img", "create", "-q", "-f", "raw", base, "32M")
	runOutput(t, "qemu-io", "-f", "raw", "-c", "write -P 0x71 0 5M", "-c", "write -P 0x72 9M 3M", "-c", "write -P 0x73 31M 1M", base)
	top := filepath.Join(dir, "top.qcow2")
	runOutput(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top, "32M")
	runOutput(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x74 1M 1M", "-c", "write -z 10M 256k", top)
	return top, []string{base}
}

// nbdData is a seeded source of random write data (fast, also under the
// race detector).
func nbdData(seed uint64) *rand.ChaCha8 {
	var s [32]byte
	binary.LittleEndian.PutUint64(s[:], seed)
	return rand.NewChaCha8(s)
}

// nbdClusterSize is the cluster size of every image nbdWriteImage makes.
const nbdClusterSize = 64 << 10

// nbdTrimShadow applies a trim to the shadow as the engine promises it
// (qcow2.Image.Discard): the whole clusters of the range, and the partial
// last cluster when the range ends at the end of the image, read as
// zeroes (v3 zero flag or extended-L2 zero bits); partial clusters keep
// their content.
func nbdTrimShadow(shadow []byte, off, n int64) {
	size := int64(len(shadow))
	lo := (off + nbdClusterSize - 1) &^ (nbdClusterSize - 1)
	hi := (off + n) &^ (nbdClusterSize - 1)
	if off+n == size {
		hi = size
	}
	if lo < hi {
		clear(shadow[lo:hi])
	}
}

// nbdQemuCheck runs qemu-img check (with extra flags such as -U) and
// returns its exit status and output.
func nbdQemuCheck(img string, flags ...string) (int, string) {
	out, err := exec.Command("qemu-img", append(append([]string{"check"}, flags...), img)...).CombinedOutput()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0, string(out)
	case errors.As(err, &ee):
		return ee.ExitCode(), string(out)
	}
	return -1, err.Error()
}

// nbdWriteRandom: seeded random writes (some FUA), zero writes (with and
// without NO_HOLE, some FAST_ZERO), trims and flushes of random sizes and
// alignments through two connections in turn, against a shadow. After
// each batch and a flush: the export read back, `qemu-img convert -U`
// and the shadow agree and `qemu-img check -U` exits 0. After SIGTERM
// the same without -U, and the files below are unchanged.
func nbdWriteRandom(t *testing.T, bin, kind string) {
	dir := t.TempDir()
	img, below := nbdWriteImage(t, dir, kind)
	before := map[string]string{}
	for _, f := range below {
		before[f] = fuseSHA(t, f)
	}
	shadow := fuseQemuRaw(t, img)
	size := int64(len(shadow))
	srv := nbdServe(t, bin, "--writable", img)
	conns := []*nbdclient.Client{
		srv.dial(t, nbdclient.Options{StructuredReplies: true}),
		srv.dial(t, nbdclient.Options{ExtendedHeaders: true}),
	}
	seed := uint64(0x9e3779b97f4a7c15)
	for _, c := range kind {
		seed = seed*31 + uint64(c)
	}
	rng := rand.New(rand.NewPCG(seed, 6))
	data := nbdData(seed)
	t.Logf("seed %#x", seed)
	const batches, perBatch = 4, 500
	buf := make([]byte, 3<<20)
	got := make([]byte, 3<<20)
	count := map[string]int{}
	for b := range batches {
		for i := range perBatch {
			c := conns[i%2]
			off, n := fuseRandomRange(rng, size)
			var err error
			op := ""
			switch r := rng.IntN(100); {
			case r < 50:
				op = "write"
				var flags nbdproto.CmdFlags
				if rng.IntN(8) == 0 {
					flags, op = nbdproto.CmdFlagFUA, "write-fua"
				}
				p := buf[:n]
				data.Read(p)
				if err = c.WriteFlags(p, off, flags); err == nil {
					copy(shadow[off:], p)
				}
			case r < 68:
				var flags nbdproto.CmdFlags
				op = "zero"
				if rng.IntN(2) == 0 {
					flags, op = nbdproto.CmdFlagNoHole, "zero-nohole"
				}
				if rng.IntN(4) == 0 {
					flags |= nbdproto.CmdFlagFastZero
					op += "-fast"
				}
				err = c.WriteZeroes(off, n, flags)
				var se *nbdproto.ServerError
				if errors.As(err, &se) && se.Errno == nbdproto.ENOTSUP && flags&nbdproto.CmdFlagFastZero != 0 {
					op, err = op+"-enotsup", nil // nothing changed
				} else if err == nil {
					clear(shadow[off : off+n])
				}
			case r < 85:
				op = "trim"
				if err = c.Trim(off, n, 0); err == nil {
					nbdTrimShadow(shadow, off, n)
				}
			case r < 90:
				op = "flush"
				err = c.Flush()
			default:
				op = "read"
				if _, err = c.ReadAt(got[:n], off); err == nil && !bytes.Equal(got[:n], shadow[off:off+n]) {
					t.Fatalf("batch %d op %d: read of %d bytes at %d differs from the shadow at +%s", b, i, n, off, firstDiff(got[:n], shadow[off:off+n]))
				}
			}
			if err != nil {
				t.Fatalf("batch %d op %d: %s of %d bytes at %d: %v\n%s", b, i, op, n, off, err, srv.stderr)
			}
			count[op]++
		}
		if err := conns[b%2].Flush(); err != nil {
			t.Fatal(err)
		}
		whole := make([]byte, size)
		if _, err := conns[(b+1)%2].ReadAt(whole, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(whole, shadow) {
			t.Fatalf("batch %d: export read back differs from the shadow at %s", b, firstDiff(whole, shadow))
		}
		if got := fuseQemuRaw(t, img, "-U"); !bytes.Equal(got, shadow) {
			t.Fatalf("batch %d: qemu-img convert -U after a flush differs from the shadow at %s", b, firstDiff(got, shadow))
		}
		if code, out := nbdQemuCheck(img, "-U"); code != 0 {
			t.Fatalf("batch %d: qemu-img check -U exits %d:\n%s", b, code, out)
		}
	}
	t.Logf("operations: %v", count)
	for _, c := range conns {
		c.Close()
	}
	srv.stop(t)
	if got := fuseQemuRaw(t, img); !bytes.Equal(got, shadow) {
		t.Errorf("qemu-img convert after stop differs from the shadow at %s", firstDiff(got, shadow))
	}
	if code, out := nbdQemuCheck(img); code != 0 {
		t.Errorf("qemu-img check after stop exits %d:\n%s", code, out)
	}
	for _, f := range below {
		if got := fuseSHA(t, f); got != before[f] {
			t.Errorf("backing file %s changed: sha256 %s, was %s", f, got, before[f])
		}
	}
	if s := serveSaid(srv.stderr.String()); s != "" {
		t.Errorf("nbdgw serve said:\n%s", s)
	}
}

// nbdWriteCrash: kill -9 the server at random moments of a write load
// with periodic flushes. Then `qemu-img check` exits 0 or 3 (leaks only)
// and every byte acknowledged before the last completed flush is there.
// A byte written once since that flush may hold its old or its new value;
// one written more than once since, any of them (not tracked).
func nbdWriteCrash(t *testing.T, bin string) {
	dir := t.TempDir()
	img, below := nbdWriteImage(t, dir, "backing")
	base := fuseSHA(t, below[0])
	rng := rand.New(rand.NewPCG(0xc4a54, 9))
	durable := fuseQemuRaw(t, img)
	size := int64(len(durable))
	buf := make([]byte, 1<<20)
	for round := range 4 {
		srv := nbdServe(t, bin, "--writable", img)
		conns := []*nbdclient.Client{
			srv.dial(t, nbdclient.Options{StructuredReplies: true}),
			srv.dial(t, nbdclient.Options{}),
		}
		latest := bytes.Clone(durable) // every write sent, acknowledged or not
		var since [][2]int64           // ranges written since the last flush
		data := nbdData(uint64(round))
		killAt := time.Duration(200+rng.IntN(1300)) * time.Millisecond
		killed := make(chan struct{})
		timer := time.AfterFunc(killAt, func() { srv.kill(); close(killed) })
		var ops, flushes int
	load:
		for i := 0; ; i++ {
			c := conns[i%2]
			off, n := fuseRandomRange(rng, size)
			n = min(n, int64(len(buf)))
			var err error
			switch r := rng.IntN(100); {
			case r < 12:
				// A flush completed: everything sent before it is durable.
				if err = c.Flush(); err == nil {
					copy(durable, latest)
					since = since[:0]
					flushes++
				}
			case r < 82:
				p := buf[:n]
				data.Read(p)
				copy(latest[off:], p)
				since = append(since, [2]int64{off, n})
				err = c.WriteFlags(p, off, 0)
			case r < 91:
				clear(latest[off : off+n])
				since = append(since, [2]int64{off, n})
				err = c.WriteZeroes(off, n, 0)
			default:
				// Trim changes whole clusters only; the model marks
				// the range touched with the zeroes it promises.
				nbdTrimShadow(latest, off, n)
				since = append(since, [2]int64{off, n})
				err = c.Trim(off, n, 0)
			}
			if err != nil {
				select {
				case <-killed:
					break load
				case <-time.After(5 * time.Second):
					t.Fatalf("round %d op %d: %v\n%s", round, i, err, srv.stderr)
				}
			}
			ops++
		}
		timer.Stop()
		t.Logf("round %d: killed after %v, %d operations, %d flushes", round, killAt, ops, flushes)
		code, out := nbdQemuCheck(img)
		t.Logf("round %d: qemu-img check exits %d", round, code)
		if code != 0 && code != 3 {
			t.Fatalf("round %d: qemu-img check after kill -9 exits %d (want 0 or 3: leaks only):\n%s", round, code, out)
		}
		got := fuseQemuRaw(t, img)
		touched := make([]uint8, size) // writes to each byte since the last flush
		for _, r := range since {
			for j := r[0]; j < r[0]+r[1]; j++ {
				touched[j] = min(touched[j]+1, 2)
			}
		}
		for j := range got {
			if got[j] == durable[j] {
				continue
			}
			ok := (touched[j] == 1 && got[j] == latest[j]) || touched[j] > 1
			if !ok {
				t.Fatalf("round %d: byte %d is %#x; the last flush made it %#x (written %d times since, latest %#x)", round, j, got[j], durable[j], touched[j], latest[j])
			}
		}
		durable = got // the next round starts from what survived
	}
	if got := fuseSHA(t, below[0]); got != base {
		t.Errorf("backing file changed: sha256 %s, was %s", got, base)
	}
}

// nbdWriteRealClients: qemu-io writes and nbdcopy copies into a writable
// export; qemu-img convert of the image then shows them.
func nbdWriteRealClients(t *testing.T, bin string) {
	dir := t.TempDir()
	img, below := nbdWriteImage(t, dir, "backing")
	base := fuseSHA(t, below[0])
	srv := nbdServe(t, bin, "--writable", img)
	out := string(runOutput(t, "qemu-io", "-f", "raw",
		"-c", "write -P 0x81 100k 300k",
		"-c", "write -f -P 0x82 5M 64k",
		"-c", "write -z 8M 1M",
		"-c", "discard 20M 2M",
		"-c", "flush",
		"-c", "read -P 0x81 100k 300k",
		"-c", "read -P 0 8M 1M",
		srv.uri()))
	if strings.Contains(out, "fail") || strings.Count(out, "wrote ") != 3 {
		t.Fatalf("qemu-io:\n%s", out)
	}
	// qemu-io through the image file must see the same, once flushed.
	qout := string(runOutput(t, "qemu-io", "-U", "-r", "-f", "qcow2",
		"-c", "read -P 0x81 100k 300k", "-c", "read -P 0x82 5M 64k", "-c", "read -P 0 8M 1M", "-c", "read -P 0 20M 2M", img))
	if strings.Contains(qout, "fail") || strings.Count(qout, "read ") != 4 {
		t.Errorf("qemu-io on the image file after the NBD writes:\n%s", qout)
	}

	// nbdcopy a raw file with data, zeroes and holes over the whole disk.
	src := filepath.Join(dir, "src.raw")
	runOutput(t, "qemu-img", "create", "-q", "-f", "raw", src, "32M")
	runOutput(t, "qemu-io", "-f", "raw", "-c", "write -P 0x91 0 3M", "-c", "write -P 0x92 7M 100k", "-c", "write -P 0x93 31M 1M", src)
	runOutput(t, "nbdcopy", "--flush", src, srv.uri())
	want := fuseReadFile(t, src)
	if got := fuseQemuRaw(t, img, "-U"); !bytes.Equal(got, want) {
		t.Errorf("after nbdcopy, qemu-img convert -U differs from the source at %s", firstDiff(got, want))
	}
	c := srv.dial(t, nbdclient.Options{StructuredReplies: true})
	got := make([]byte, len(want))
	if _, err := c.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Errorf("after nbdcopy, the export reads differently (%v)", err)
	}
	c.Close()
	srv.stop(t)
	if code, out := nbdQemuCheck(img); code != 0 {
		t.Errorf("qemu-img check exits %d:\n%s", code, out)
	}
	if got := fuseQemuRaw(t, img); !bytes.Equal(got, want) {
		t.Errorf("after stop, qemu-img convert differs from the source at %s", firstDiff(got, want))
	}
	if got := fuseSHA(t, below[0]); got != base {
		t.Errorf("backing file changed")
	}
}

// nbdWriteSnapshot: --snapshot takes writes (read back through the
// export) and leaves every file of the chain byte-identical.
func nbdWriteSnapshot(t *testing.T, bin string) {
	dir := t.TempDir()
	img, below := nbdWriteImage(t, dir, "backing")
	files := append([]string{img}, below...)
	before := map[string]string{}
	for _, f := range files {
		before[f] = fuseSHA(t, f)
	}
	orig := fuseQemuRaw(t, img)
	srv := nbdServe(t, bin, "--snapshot", img)
	c := srv.dial(t, nbdclient.Options{StructuredReplies: true})
	if c.TransmissionFlags()&nbdproto.FlagReadOnly != 0 {
		t.Fatal("--snapshot export is read-only")
	}
	shadow := bytes.Clone(orig)
	rng := rand.New(rand.NewPCG(5, 5))
	data := nbdData(5)
	p := make([]byte, 2<<20)
	for range 40 {
		off, n := fuseRandomRange(rng, int64(len(shadow)))
		n = min(n, int64(len(p)))
		data.Read(p[:n])
		if err := c.WriteFlags(p[:n], off, nbdproto.CmdFlagFUA); err != nil {
			t.Fatal(err)
		}
		copy(shadow[off:], p[:n])
	}
	if err := c.WriteZeroes(0, 1<<20, 0); err != nil {
		t.Fatal(err)
	}
	clear(shadow[:1<<20])
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(shadow))
	if _, err := c.ReadAt(got, 0); err != nil || !bytes.Equal(got, shadow) {
		t.Fatalf("--snapshot export reads back differently (%v)", err)
	}
	if got := fuseQemuRaw(t, img, "-U"); !bytes.Equal(got, orig) {
		t.Errorf("image content changed under --snapshot at %s", firstDiff(got, orig))
	}
	c.Close()
	srv.stop(t)
	for _, f := range files {
		if got := fuseSHA(t, f); got != before[f] {
			t.Errorf("%s changed under --snapshot", f)
		}
	}
	if ents, _ := os.ReadDir(dir); len(ents) != len(files) {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Errorf("files left in the image directory: %v", names)
	}
}

// nbdWriteForensic: without --writable, writes, zero writes and trims
// through the Go client and qemu-io fail with EPERM, and no file of the
// chain changes.
func nbdWriteForensic(t *testing.T, bin string) {
	for _, kind := range []string{"backing", "raw-backing", "compressed", "extended-l2"} {
		t.Run(kind, func(t *testing.T) {
			dir := t.TempDir()
			img, below := nbdWriteImage(t, dir, kind)
			files := append([]string{img}, below...)
			before := map[string]string{}
			for _, f := range files {
				before[f] = fuseSHA(t, f)
			}
			srv := nbdServe(t, bin, img)
			for _, opts := range []nbdclient.Options{{}, {StructuredReplies: true}, {ExtendedHeaders: true}} {
				c := srv.dial(t, opts)
				if c.TransmissionFlags()&nbdproto.FlagReadOnly == 0 {
					t.Errorf("export without --writable lacks NBD_FLAG_READ_ONLY")
				}
				for name, f := range map[string]func() error{
					"write":        func() error { return c.WriteFlags(make([]byte, 1<<20), 4096, nbdproto.CmdFlagFUA) },
					"write-zeroes": func() error { return c.WriteZeroes(0, 8<<20, 0) },
					"fast-zero":    func() error { return c.WriteZeroes(0, 8<<20, nbdproto.CmdFlagFastZero) },
					"trim":         func() error { return c.Trim(0, 32<<20, 0) },
				} {
					var se *nbdproto.ServerError
					if err := f(); !errors.As(err, &se) || se.Errno != nbdproto.EPERM {
						t.Errorf("%s on a read-only export (%+v): %v, want EPERM", name, opts, err)
					}
				}
				if err := c.Flush(); err != nil {
					t.Errorf("flush: %v", err)
				}
				c.Close()
			}
			for _, cmd := range []string{"write -P 0xee 0 64k", "write -z 1M 1M", "discard 2M 1M"} {
				// qemu-io honours NBD_FLAG_READ_ONLY: opening the export
				// for writing fails with EPERM before anything is sent.
				out, err := exec.Command("qemu-io", "-f", "raw", "-c", cmd, srv.uri()).CombinedOutput()
				if err == nil || !strings.Contains(string(out), "Permission denied") {
					t.Errorf("qemu-io %q on a read-only export: %v\n%s", cmd, err, out)
				}
			}
			srv.stop(t)
			for _, f := range files {
				if got := fuseSHA(t, f); got != before[f] {
					t.Errorf("%s changed: sha256 %s, was %s", f, got, before[f])
				}
			}
		})
	}
}

// nbdWriteSigterm: SIGTERM while two connections keep writing. The
// server answers the requests in flight, flushes and closes the image,
// and exits 0; then qemu-img check is clean (not even leaks) and every
// acknowledged write is in the image, flush or not. A write that got no
// answer may or may not be there.
func nbdWriteSigterm(t *testing.T, bin string) {
	dir := t.TempDir()
	img, _ := nbdWriteImage(t, dir, "backing")
	shadow := fuseQemuRaw(t, img)
	size := int64(len(shadow))
	srv := nbdServe(t, bin, "--writable", img)
	type result struct {
		k       int    // the connection
		acked   []byte // the shadow with its acknowledged writes
		pending [2]int64
	}
	results := make(chan result, 2)
	for k := range 2 {
		c := srv.dial(t, nbdclient.Options{StructuredReplies: k == 0})
		rng := rand.New(rand.NewPCG(uint64(k), 77))
		data := nbdData(uint64(k))
		go func() {
			// Each connection writes its own half of the disk.
			acked := bytes.Clone(shadow)
			half := size / 2
			p := make([]byte, 256<<10)
			for {
				off, n := fuseRandomRange(rng, half)
				n = min(n, int64(len(p)))
				off += int64(k) * half
				data.Read(p[:n])
				if err := c.WriteFlags(p[:n], off, 0); err != nil {
					results <- result{k: k, acked: acked, pending: [2]int64{off, n}}
					return
				}
				copy(acked[off:], p[:n])
			}
		}()
	}
	time.Sleep(700 * time.Millisecond)
	srv.stop(t)
	var res [2]result
	for range 2 {
		r := <-results
		res[r.k] = r
	}
	if code, out := nbdQemuCheck(img); code != 0 {
		t.Errorf("qemu-img check after SIGTERM exits %d:\n%s", code, out)
	}
	got := fuseQemuRaw(t, img)
	for k, r := range res {
		lo, hi := int64(k)*size/2, int64(k+1)*size/2
		for j := lo; j < hi; j++ {
			if got[j] != r.acked[j] && (j < r.pending[0] || j >= r.pending[0]+r.pending[1]) {
				t.Fatalf("byte %d is %#x, the last acknowledged write made it %#x (unanswered write: %d+%d)", j, got[j], r.acked[j], r.pending[0], r.pending[1])
			}
		}
	}
}

// nbdWriteRefusals: command lines that must not serve writes, each
// leaving the chain byte-identical.
func nbdWriteRefusals(t *testing.T, bin string) {
	dir := t.TempDir()
	img, below := nbdWriteImage(t, dir, "backing")
	snap := filepath.Join(dir, "snap.qcow2")
	runOutput(t, "qemu-img", "create", "-q", "-f", "qcow2", snap, "1M")
	runOutput(t, "qemu-img", "snapshot", "-c", "s1", snap)
	files := append([]string{img, snap}, below...)
	before := map[string]string{}
	for _, f := range files {
		before[f] = fuseSHA(t, f)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--writable", "--no-backing", img}, "has a backing file"},
		{[]string{"--writable", "--snapshot", img}, "exclude each other"},
		{[]string{"--writable", snap}, "snapshots"},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		out, err := exec.CommandContext(ctx, bin, append([]string{"serve", "--socket", filepath.Join(dir, "x.sock")}, tc.args...)...).CombinedOutput()
		cancel()
		if err == nil || !strings.Contains(string(out), tc.want) {
			t.Errorf("serve %q: %v %s (want it to mention %q)", tc.args, err, out, tc.want)
		}
	}
	for _, f := range files {
		if got := fuseSHA(t, f); got != before[f] {
			t.Errorf("%s changed", f)
		}
	}
}

// nbdWriteQemuIOLoad: a seeded random load of writes, FUA writes and zero
// writes (with and without unmap) sent by qemu-io, a real client, through
// nbdgw serve; the same commands run by qemu-io on a raw copy of the
// chain are the oracle: qemu-img compare must find the two identical, and
// qemu-img check the image clean.
func nbdWriteQemuIOLoad(t *testing.T, bin, kind string) {
	dir := t.TempDir()
	img, _ := nbdWriteImage(t, dir, kind)
	shadow := filepath.Join(dir, "shadow.raw")
	runOutput(t, "qemu-img", "convert", "-U", "-O", "raw", img, shadow)
	size := int64(32 << 20)
	rng := rand.New(rand.NewPCG(uint64(len(kind)), 11))
	var cmds []string
	for i := range 300 {
		off := rng.Int64N(size - 1)
		n := 1 + rng.Int64N(min(size-off, 300<<10))
		if rng.IntN(2) == 0 { // sector-aligned, as most guests write
			off &^= 511
			n = max(512, n&^511)
		}
		switch rng.IntN(6) {
		case 0:
			cmds = append(cmds, fmt.Sprintf("write -z %d %d", off, n))
		case 1:
			cmds = append(cmds, fmt.Sprintf("write -z -u %d %d", off, n))
		case 2:
			cmds = append(cmds, fmt.Sprintf("write -f -P %d %d %d", i%251, off, n))
		default:
			cmds = append(cmds, fmt.Sprintf("write -P %d %d %d", i%251, off, n))
		}
		if i%50 == 49 {
			cmds = append(cmds, "flush")
		}
	}
	args := func(target string, format string) []string {
		a := []string{"-f", format}
		for _, c := range cmds {
			a = append(a, "-c", c)
		}
		return append(a, target)
	}
	srv := nbdServe(t, bin, "--writable", img)
	out := string(runOutput(t, "qemu-io", args(srv.uri(), "raw")...))
	if strings.Contains(out, "fail") || strings.Count(out, "wrote ") != 300 {
		t.Fatalf("qemu-io through nbdgw serve:\n%s", out)
	}
	if strings.Contains(string(runOutput(t, "qemu-io", args(shadow, "raw")...)), "fail") {
		t.Fatal("qemu-io on the raw shadow failed")
	}
	srv.stop(t)
	if code, out := nbdQemuCheck(img); code != 0 {
		t.Errorf("qemu-img check exits %d:\n%s", code, out)
	}
	if out, err := exec.Command("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, shadow).CombinedOutput(); err != nil {
		t.Errorf("qemu-img compare with the shadow: %v\n%s", err, out)
	}
}

// nbdWriteFio: fio's nbd engine (libnbd) writes 4 KiB blocks at random
// with 16 in flight and verifies each block's checksum on read-back.
func nbdWriteFio(t *testing.T, bin string) {
	if out, err := exec.Command("fio", "--enghelp=nbd").CombinedOutput(); err != nil {
		t.Fatalf("fio with the nbd engine is needed (scripts/install-deps.sh installs fio): %v\n%s", err, out)
	}
	dir := t.TempDir()
	img, _ := nbdWriteImage(t, dir, "backing")
	srv := nbdServe(t, bin, "--writable", img)
	out, err := exec.Command("fio", "--name=verify", "--ioengine=nbd", "--uri="+srv.uri(),
		"--rw=randwrite", "--bs=4k", "--size=16M", "--iodepth=16", "--verify=crc32c",
		"--do_verify=1", "--verify_fatal=1", "--randrepeat=1", "--output-format=terse").CombinedOutput()
	if err != nil {
		t.Fatalf("fio: %v\n%s\nserver:\n%s", err, out, srv.stderr)
	}
	srv.stop(t)
	if code, out := nbdQemuCheck(img); code != 0 {
		t.Errorf("qemu-img check exits %d:\n%s", code, out)
	}
}
