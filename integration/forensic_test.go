package integration

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
)

// TestForensicReadOnly is the proof that evidence stays untouched: every
// image of a corpus of valid images (backing chains over qcow2 and raw,
// compressed zlib and zstd, extended L2, external data files, v2, internal
// snapshots, bitmaps) is served and mounted in the default mode; every
// front end is asked to write (NBD WRITE, TRIM, WRITE_ZEROES from a raw
// client, nbdcopy and qemu-io onto the export; open for writing,
// truncate, fallocate, setxattr, chmod, utimes, create, unlink, rename
// under the FUSE mount). Every attempt must fail, nbdgw must hold every
// chain file O_RDONLY (/proc/PID/fdinfo), inotify must see no file of the
// chain opened for writing or modified, and the sha256 and mtime of every
// file must be the same afterwards. serve --snapshot must accept writes
// into a temporary overlay, with the same guarantees for the chain.
func TestForensicReadOnly(t *testing.T) {
	t.Parallel()
	hardRequire(t, "qemu-img", "qemu-io", "nbdcopy")
	bin := nbdgwBinary(t)
	images := hardValidCorpus(t, t.TempDir())
	fuse := hardFUSE()
	for _, im := range images {
		t.Run(im.name, func(t *testing.T) {
			t.Parallel()
			before := hardFingerprints(t, im.files)
			want := hardSHA(hardQemuRaw(t, im.top))
			w := hardWatch(t, im.files)

			hardForensicCLI(t, bin, im)
			hardForensicServe(t, bin, im, want)
			hardForensicSnapshot(t, bin, im)
			t.Run("mount", func(t *testing.T) {
				if fuse != "" {
					t.Skipf("FUSE part: %s", fuse) // scripts/test.sh fails on it
				}
				hardForensicMount(t, bin, im, want)
			})

			if ev := w.stop(); len(ev) > 0 {
				t.Errorf("inotify saw the chain written to:\n%s", strings.Join(ev, "\n"))
			}
			after := hardFingerprints(t, im.files)
			for _, f := range im.files {
				if before[f] != after[f] {
					t.Errorf("EVIDENCE CHANGED: %s: %s -> %s", f, before[f], after[f])
				}
			}
		})
	}
}

// hardValid is one valid image and every file its chain reads.
type hardValid struct {
	name  string
	top   string
	files []string
}

func hardValidCorpus(t *testing.T, dir string) []hardValid {
	var out []hardValid
	add := func(name string, steps [][]string, top string, files ...string) {
		d := filepath.Join(dir, name)
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		for _, s := range steps {
			cmd := hardExec(60*time.Second, s[0], s[1:]...)
			if cmd.code != 0 {
				t.Fatalf("%s: %s", name, cmd)
			}
		}
		v := hardValid{name: name, top: filepath.Join(d, top)}
		for _, f := range append([]string{top}, files...) {
			v.files = append(v.files, filepath.Join(d, f))
		}
		out = append(out, v)
	}
	p := func(name, f string) string { return filepath.Join(dir, name, f) }

	top, files := hardChain(t, mustMkdir(t, filepath.Join(dir, "chain-bitmap")))
	out = append(out, hardValid{name: "chain-bitmap", top: top, files: files})

	add("raw-base", [][]string{
		{"qemu-img", "create", "-q", "-f", "raw", p("raw-base", "base.raw"), "16M"},
		{"qemu-io", "-f", "raw", "-c", "write -q -P 0x31 0 4M", "-c", "write -q -P 0x32 8M 1M", p("raw-base", "base.raw")},
		{"qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", p("raw-base", "top.qcow2"), "16M"},
		{"qemu-io", "-f", "qcow2", "-c", "write -q -P 0x33 1M 1M", "-c", "write -q -z 8M 64k", p("raw-base", "top.qcow2")},
	}, "top.qcow2", "base.raw")
	add("zstd-compressed", [][]string{
		{"qemu-img", "create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", p("zstd-compressed", "z.qcow2"), "8M"},
		{"qemu-io", "-f", "qcow2", "-c", "write -q -c -P 0x41 0 2M", "-c", "write -q -P 0x42 4M 1M", p("zstd-compressed", "z.qcow2")},
	}, "z.qcow2")
	add("extended-l2", [][]string{
		{"qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=128k", p("extended-l2", "base.qcow2"), "8M"},
		{"qemu-io", "-f", "qcow2", "-c", "write -q -P 0x51 0 1M", p("extended-l2", "base.qcow2")},
		{"qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=128k", "-b", "base.qcow2", "-F", "qcow2", p("extended-l2", "top.qcow2"), "8M"},
		{"qemu-io", "-f", "qcow2", "-c", "write -q -P 0x52 4k 4k", "-c", "write -q -z 64k 4k", "-c", "write -q -c -P 0x53 2M 128k", p("extended-l2", "top.qcow2")},
	}, "top.qcow2", "base.qcow2")
	add("data-file", [][]string{
		{"qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=" + p("data-file", "data.raw"), p("data-file", "d.qcow2"), "8M"},
		{"qemu-io", "-f", "qcow2", "-c", "write -q -P 0x61 0 1M", "-c", "write -q -z 2M 1M", p("data-file", "d.qcow2")},
	}, "d.qcow2", "data.raw")
	add("data-file-raw", [][]string{
		{"qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=" + p("data-file-raw", "data.raw") + ",data_file_raw=on", p("data-file-raw", "d.qcow2"), "8M"},
		{"qemu-io", "-f", "qcow2", "-c", "write -q -P 0x62 1M 1M", p("data-file-raw", "d.qcow2")},
	}, "d.qcow2", "data.raw")
	add("v2-snapshot", [][]string{
		{"qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", p("v2-snapshot", "v2.qcow2"), "8M"},
		{"qemu-io", "-f", "qcow2", "-c", "write -q -P 0x71 0 1M", p("v2-snapshot", "v2.qcow2")},
		{"qemu-img", "snapshot", "-c", "snap1", p("v2-snapshot", "v2.qcow2")},
		{"qemu-io", "-f", "qcow2", "-c", "write -q -P 0x72 512k 1M", p("v2-snapshot", "v2.qcow2")},
	}, "v2.qcow2")
	add("three-layers-short-backing", [][]string{
		{"qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", p("three-layers-short-backing", "l3.qcow2"), "2M"},
		{"qemu-io", "-f", "qcow2", "-c", "write -q -P 0x81 0 2M", p("three-layers-short-backing", "l3.qcow2")},
		{"qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", "-b", "l3.qcow2", "-F", "qcow2", p("three-layers-short-backing", "l2.qcow2"), "6M"},
		{"qemu-io", "-f", "qcow2", "-c", "write -q -P 0x82 4M 1M", p("three-layers-short-backing", "l2.qcow2")},
		{"qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-b", "l2.qcow2", "-F", "qcow2", p("three-layers-short-backing", "l1.qcow2"), "10M"},
		{"qemu-img", "bitmap", "--add", p("three-layers-short-backing", "l1.qcow2"), "inc0"},
		{"qemu-img", "bitmap", "--add", "-g", "1M", p("three-layers-short-backing", "l1.qcow2"), "inc1"},
		{"qemu-io", "-f", "qcow2", "-c", "write -q -P 0x83 1k 3k", "-c", "write -q -P 0x84 8M 1M", p("three-layers-short-backing", "l1.qcow2")},
	}, "l1.qcow2", "l2.qcow2", "l3.qcow2")
	return out
}

func mustMkdir(t *testing.T, d string) string {
	if err := os.MkdirAll(d, 0o755); err != nil {
		t.Fatal(err)
	}
	return d
}

func hardSHA(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// hardFingerprints is sha256, size and mtime of each file.
func hardFingerprints(t *testing.T, files []string) map[string]string {
	out := map[string]string{}
	for _, f := range files {
		fh, err := os.Open(f)
		if err != nil {
			t.Fatal(err)
		}
		h := sha256.New()
		if _, err := io.Copy(h, fh); err != nil {
			t.Fatal(err)
		}
		fi, err := fh.Stat()
		fh.Close()
		if err != nil {
			t.Fatal(err)
		}
		out[f] = fmt.Sprintf("sha256 %x size %d mtime %s", h.Sum(nil), fi.Size(), fi.ModTime().Format(time.RFC3339Nano))
	}
	return out
}

// hardWatcher records inotify events that mean a file was opened for
// writing or changed.
type hardWatcher struct {
	fd     int
	names  map[int32]string
	mu     sync.Mutex // guards events
	events []string
	done   chan struct{}
	quit   atomic.Bool
}

func hardWatch(t *testing.T, files []string) *hardWatcher {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		t.Skipf("inotify: %v", err)
	}
	w := &hardWatcher{fd: fd, names: map[int32]string{}, done: make(chan struct{})}
	for _, f := range files {
		wd, err := unix.InotifyAddWatch(fd, f, unix.IN_MODIFY|unix.IN_CLOSE_WRITE|unix.IN_ATTRIB|unix.IN_DELETE_SELF|unix.IN_MOVE_SELF)
		if err != nil {
			t.Fatal(err)
		}
		w.names[int32(wd)] = f
	}
	go func() {
		defer close(w.done)
		buf := make([]byte, 64<<10)
		for {
			n, err := unix.Read(fd, buf)
			if errors.Is(err, unix.EAGAIN) {
				if w.quit.Load() {
					return
				}
				time.Sleep(20 * time.Millisecond)
				continue
			}
			if err != nil || n <= 0 {
				return
			}
			for off := 0; off+unix.SizeofInotifyEvent <= n; {
				ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
				w.mu.Lock()
				w.events = append(w.events, fmt.Sprintf("%s: mask %#x", w.names[ev.Wd], ev.Mask))
				w.mu.Unlock()
				off += unix.SizeofInotifyEvent + int(ev.Len)
			}
		}
	}()
	return w
}

// stop ends the watch and returns the events seen.
func (w *hardWatcher) stop() []string {
	time.Sleep(100 * time.Millisecond) // let late events arrive
	w.quit.Store(true)
	<-w.done
	unix.Close(w.fd)
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.events
}

// hardHeldReadOnly checks that process pid holds every file of the chain
// and holds none of them with write access.
func hardHeldReadOnly(t *testing.T, pid int, files []string, what string) {
	t.Helper()
	held, err := hardPIDFiles(pid)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	for _, f := range files {
		real, err := filepath.EvalSymlinks(f)
		if err != nil {
			t.Fatal(err)
		}
		flags, ok := held[real]
		if !ok {
			t.Errorf("%s holds no descriptor of %s: the check would prove nothing", what, f)
		}
		for _, fl := range flags {
			if fl&syscall.O_ACCMODE != syscall.O_RDONLY {
				t.Errorf("EVIDENCE AT RISK: %s holds %s with flags %#o", what, f, fl)
			}
		}
	}
}

// hardForensicCLI runs the read commands (they must succeed; the
// watcher and fingerprints prove they wrote nothing).
func hardForensicCLI(t *testing.T, bin string, im hardValid) {
	for _, args := range [][]string{
		{"info", "--output=json", im.top},
		{"map", "--output=json", im.top},
		{"map", "--context", "qemu:joint-allocation", im.top},
		{"map", "--no-backing", "--context", "qemu:allocation-depth", im.top},
	} {
		r := hardExec(30*time.Second, bin, args...)
		hardSane(t, r)
		if r.code != 0 {
			t.Errorf("%s", r)
		}
	}
}

// hardForensicServe serves the image and tries to write through NBD.
func hardForensicServe(t *testing.T, bin string, im hardValid, want string) {
	s, r := hardServe(t, bin, im.top)
	if s == nil {
		t.Fatalf("serve: %s", r)
	}
	hardHeldReadOnly(t, s.cmd.Process.Pid, im.files, "nbdgw serve")

	// Raw requests in every framing: each must fail with EPERM.
	for _, mode := range []nbdproto.Option{0, nbdproto.OptStructuredReply, nbdproto.OptExtendedHeaders} {
		rc, err := hardHandshake("unix", s.socket, mode)
		if err != nil {
			t.Fatal(err)
		}
		rc.SetDeadline(time.Now().Add(30 * time.Second))
		ext := mode == nbdproto.OptExtendedHeaders
		payload := make([]byte, 65536)
		for i := range payload {
			payload[i] = 0xee
		}
		reqs := [][]byte{
			append(hardReq(ext, 0, nbdproto.CmdWrite, 1, 0, 65536), payload...),
			append(hardReq(ext, 1, nbdproto.CmdWrite, 2, 4096, 65536), payload...), // FUA
			hardReq(ext, 0, nbdproto.CmdTrim, 3, 0, 1<<20),
			hardReq(ext, 0, nbdproto.CmdWriteZeroes, 4, 0, 1<<20),
			hardReq(ext, 2, nbdproto.CmdWriteZeroes, 5, 0, 1<<20), // NO_HOLE
		}
		for i, q := range reqs {
			if _, err := rc.Write(q); err != nil {
				t.Fatal(err)
			}
			var errno nbdproto.Errno
			if mode == 0 {
				errno, _, _, err = rc.simpleReply(0)
			} else if ext {
				errno, err = rc.extendedErrno()
			} else {
				var ch hardChunk
				ch, err = rc.chunk()
				if err == nil && len(ch.payload) >= 4 && ch.typ != nbdproto.ReplyTypeNone {
					errno = nbdproto.Errno(hardBE.Uint32(ch.payload))
				}
			}
			if err != nil || errno != nbdproto.EPERM {
				t.Errorf("mode %d write request %d: errno %d, %v; want EPERM", mode, i, errno, err)
			}
		}
		rc.Write(hardReq(ext, 0, nbdproto.CmdDisc, 9, 0, 0))
		rc.Close()
	}

	// Real clients that try to write.
	junk := filepath.Join(t.TempDir(), "junk")
	if err := os.WriteFile(junk, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	if r := hardExec(30*time.Second, "nbdcopy", junk, s.uri); r.code == 0 {
		t.Errorf("nbdcopy onto the export succeeded")
	}
	if r := hardExec(30*time.Second, "qemu-io", "-f", "raw", "-c", "write -P 0xee 0 64k", "-c", "discard 0 1M", s.uri); r.code == 0 && !strings.Contains(string(r.stdout)+string(r.stderr), "ermission") && !strings.Contains(string(r.stdout)+string(r.stderr), "read-only") && !strings.Contains(string(r.stdout)+string(r.stderr), "Read-only") {
		t.Errorf("qemu-io wrote to the export: %s\n%s", r.stdout, r.stderr)
	}
	// And the export still reads what qemu-img reads.
	if r := hardExec(60*time.Second, "nbdcopy", s.uri, "-"); r.code != 0 || hardSHA(r.stdout) != want {
		t.Errorf("nbdcopy after the write attempts: exit %d, content equal to qemu-img convert: %v", r.code, hardSHA(r.stdout) == want)
	}
	hardHeldReadOnly(t, s.cmd.Process.Pid, im.files, "nbdgw serve")
	r = s.stop(t)
	hardSane(t, r)
}

// hardForensicSnapshot serves with --snapshot: writes are accepted and
// read back, into a temporary overlay; the chain is still held read-only
// and nothing is left behind next to it.
func hardForensicSnapshot(t *testing.T, bin string, im hardValid) {
	dir := filepath.Dir(im.top)
	entries := func() []string {
		es, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, e := range es {
			out = append(out, e.Name())
		}
		return out
	}
	before := entries()
	s, r := hardServe(t, bin, "--snapshot", im.top)
	if s == nil {
		// The overlay takes the writes, so every image the engine reads
		// must serve with --snapshot: a refusal is a failure.
		t.Fatalf("serve --snapshot: %s", r)
	}
	hardHeldReadOnly(t, s.cmd.Process.Pid, im.files, "nbdgw serve --snapshot")
	w := hardExec(30*time.Second, "qemu-io", "-f", "raw", "-c", "write -q -P 0xee 0 64k", "-c", "write -q -z 64k 64k", "-c", "discard -q 128k 64k", s.uri)
	if w.code != 0 || len(w.stderr) != 0 {
		t.Errorf("writes to a --snapshot export: %s", w)
	}
	got := hardExec(60*time.Second, "nbdcopy", s.uri, "-")
	if got.code != 0 || len(got.stdout) < 128<<10 {
		t.Fatalf("nbdcopy of the --snapshot export: %s", got)
	}
	for i, b := range got.stdout[:64<<10] {
		if b != 0xee {
			t.Errorf("--snapshot export at %d reads %#x after writing 0xee", i, b)
			break
		}
	}
	for i, b := range got.stdout[64<<10 : 128<<10] {
		if b != 0 {
			t.Errorf("--snapshot export at %d reads %#x after write zeroes", 64<<10+i, b)
			break
		}
	}
	hardHeldReadOnly(t, s.cmd.Process.Pid, im.files, "nbdgw serve --snapshot")
	r = s.stop(t)
	hardSane(t, r)
	if after := entries(); strings.Join(after, " ") != strings.Join(before, " ") {
		t.Errorf("serve --snapshot left files next to the image: before %q, after %q", before, after)
	}
}

// extendedErrno reads one extended reply chunk and returns the errno of
// an error chunk (0 otherwise).
func (rc *hardRawConn) extendedErrno() (nbdproto.Errno, error) {
	var h [32]byte
	if _, err := io.ReadFull(rc.r, h[:]); err != nil {
		return 0, err
	}
	if hardBE.Uint32(h[:]) != nbdproto.ExtendedReplyMagic {
		return 0, fmt.Errorf("extended reply magic %#x", hardBE.Uint32(h[:]))
	}
	n := hardBE.Uint64(h[24:])
	if n > 1<<20 {
		return 0, fmt.Errorf("reply of %d bytes", n)
	}
	p := make([]byte, n)
	if _, err := io.ReadFull(rc.r, p); err != nil {
		return 0, err
	}
	if nbdproto.ReplyType(hardBE.Uint16(h[6:])) == nbdproto.ReplyTypeError && len(p) >= 4 {
		return nbdproto.Errno(hardBE.Uint32(p)), nil
	}
	return 0, nil
}

// hardForensicMount mounts the image and tries every way of writing.
func hardForensicMount(t *testing.T, bin string, im hardValid, want string) {
	m, r := hardMount(t, bin, im.top)
	if m == nil {
		t.Fatalf("mount: %s", r)
	}
	pid := m.cmd.Process.Pid
	hardHeldReadOnly(t, pid, im.files, "nbdgw mount")
	targets := []string{"disk", "info.json", "maps/base-allocation", "layers/1/disk"}
	if hasBacking(im) {
		targets = append(targets, "layers/2/disk")
	}
	type attempt struct {
		name string
		do   func(path string) error
	}
	attempts := []attempt{
		{"open O_WRONLY", func(p string) error { return hardClose(os.OpenFile(p, os.O_WRONLY, 0)) }},
		{"open O_RDWR", func(p string) error { return hardClose(os.OpenFile(p, os.O_RDWR, 0)) }},
		{"open O_TRUNC", func(p string) error { return hardClose(os.OpenFile(p, os.O_WRONLY|os.O_TRUNC, 0)) }},
		{"open O_APPEND", func(p string) error { return hardClose(os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0)) }},
		{"write", func(p string) error { return os.WriteFile(p, []byte("evidence tampering"), 0o644) }},
		{"truncate", func(p string) error { return os.Truncate(p, 0) }},
		{"truncate grow", func(p string) error { return os.Truncate(p, 1<<40) }},
		{"fallocate", func(p string) error {
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			defer f.Close()
			return unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, 4096)
		}},
		{"setxattr", func(p string) error { return unix.Setxattr(p, "user.nbdgw", []byte("x"), 0) }},
		{"removexattr", func(p string) error { return unix.Removexattr(p, "user.nbdgw") }},
		{"chmod", func(p string) error { return os.Chmod(p, 0o666) }},
		{"chown", func(p string) error { return os.Chown(p, 1, 1) }},
		{"utimes", func(p string) error { return os.Chtimes(p, time.Unix(1, 0), time.Unix(1, 0)) }},
		{"rename", func(p string) error { return os.Rename(p, p+".moved") }},
		{"unlink", func(p string) error { return os.Remove(p) }},
		{"link", func(p string) error { return os.Link(p, p+".link") }},
	}
	for _, target := range targets {
		p := filepath.Join(m.dir, target)
		if _, err := os.Stat(p); err != nil {
			t.Errorf("%s: %v", target, err)
			continue
		}
		for _, a := range attempts {
			if err := hardWithin(10*time.Second, func() error { return a.do(p) }); err == nil {
				t.Errorf("EVIDENCE AT RISK: %s on %s succeeded", a.name, target)
			} else if strings.HasPrefix(err.Error(), "HANG") {
				t.Error(err)
			}
		}
	}
	for _, a := range []attempt{
		{"create", func(p string) error { return os.WriteFile(filepath.Join(p, "new"), nil, 0o644) }},
		{"mkdir", func(p string) error { return os.Mkdir(filepath.Join(p, "newdir"), 0o755) }},
		{"symlink", func(p string) error { return os.Symlink("disk", filepath.Join(p, "sym")) }},
		{"mknod", func(p string) error { return unix.Mknod(filepath.Join(p, "fifo"), unix.S_IFIFO|0o644, 0) }},
		{"rmdir maps", func(p string) error { return os.Remove(filepath.Join(p, "maps")) }},
	} {
		if err := hardWithin(10*time.Second, func() error { return a.do(m.dir) }); err == nil {
			t.Errorf("EVIDENCE AT RISK: %s in the mount succeeded", a.name)
		}
	}
	// A real tool: dd onto the disk.
	if r := hardExec(30*time.Second, "dd", "if=/dev/zero", "of="+filepath.Join(m.dir, "disk"), "bs=4k", "count=1", "conv=notrunc"); r.code == 0 {
		t.Errorf("dd onto disk succeeded")
	}
	// The disk still reads what qemu-img reads.
	if b, err := hardReadFile(filepath.Join(m.dir, "disk"), 60*time.Second); err != nil || hardSHA(b) != want {
		t.Errorf("cat disk after the write attempts: %v, content equal to qemu-img convert: %v", err, hardSHA(b) == want)
	}
	hardHeldReadOnly(t, pid, im.files, "nbdgw mount")
	r = m.stop(t)
	hardSane(t, r)
}

// hasBacking: the second file of the chain is a backing file, not an
// external data file.
func hasBacking(im hardValid) bool {
	return len(im.files) > 1 && !strings.HasPrefix(im.name, "data-file")
}

func hardClose(f *os.File, err error) error {
	if f != nil {
		f.Close()
	}
	return err
}

// hardWithin runs fn with a deadline: a FUSE call must not hang.
func hardWithin(d time.Duration, fn func() error) error {
	ch := make(chan error, 1)
	go func() { ch <- fn() }()
	select {
	case err := <-ch:
		return err
	case <-time.After(d):
		return fmt.Errorf("HANG: no answer in %v", d)
	}
}
