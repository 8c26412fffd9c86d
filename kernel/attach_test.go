package kernel

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/genetlink/genltest"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
	"github.com/nbdgw/nbdgw/qcow2"
)

// fakeKernel plays the nbd driver behind genltest's fake family: CONNECT
// takes its own copies of the sockets (as the kernel's sockfd_lookup
// does), DISCONNECT sends NBD_CMD_DISC on them and closes them, STATUS
// reports the state.
type fakeKernel struct {
	t     *testing.T
	index uint32
	// refuse makes CONNECT fail with this errno.
	refuse unix.Errno
	// keepOnRefuse keeps the socket references of a refused CONNECT.
	keepOnRefuse bool

	mu           sync.Mutex // guards the fields below
	connected    bool
	conns        []net.Conn
	size         uint64
	serverFlags  uint64
	backend      string
	disconnects  int
	connectCalls int
	reconfigures int
}

// takeSockets duplicates the descriptors of the SOCKETS attribute of a
// request, as the kernel's sockfd_lookup takes references.
func (k *fakeKernel) takeSockets(data []byte) ([]net.Conn, error) {
	ad, err := netlink.NewAttributeDecoder(data)
	if err != nil {
		return nil, err
	}
	var conns []net.Conn
	for ad.Next() {
		if ad.Type() != attrSockets {
			continue
		}
		ad.Nested(func(nad *netlink.AttributeDecoder) error {
			for nad.Next() {
				nad.Nested(func(sad *netlink.AttributeDecoder) error {
					for sad.Next() {
						if sad.Type() != sockFD {
							continue
						}
						nfd, err := unix.Dup(int(sad.Uint32()))
						if err != nil {
							return err
						}
						f := os.NewFile(uintptr(nfd), "kernel-socket")
						c, err := net.FileConn(f)
						f.Close()
						if err != nil {
							return err
						}
						conns = append(conns, c)
					}
					return nil
				})
			}
			return nil
		})
	}
	if err := ad.Err(); err != nil {
		return nil, err
	}
	return conns, nil
}

func (k *fakeKernel) serve(greq genetlink.Message, _ netlink.Message) ([]genetlink.Message, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	switch Command(greq.Header.Command) {
	case CmdReconfigure:
		// The kernel replaces a dead socket with the new one.
		k.reconfigures++
		conns, err := k.takeSockets(greq.Data)
		if err != nil {
			return nil, err
		}
		for _, c := range k.conns {
			c.Close()
		}
		k.conns = conns
		return nil, io.EOF // an acknowledgement
	case CmdConnect:
		k.connectCalls++
		ad, err := netlink.NewAttributeDecoder(greq.Data)
		if err != nil {
			return nil, err
		}
		var fds []int
		for ad.Next() {
			switch ad.Type() {
			case attrSizeBytes:
				k.size = ad.Uint64()
			case attrServerFlags:
				k.serverFlags = ad.Uint64()
			case attrBackendIdentifier:
				k.backend = ad.String()
			case attrSockets:
				ad.Nested(func(nad *netlink.AttributeDecoder) error {
					for nad.Next() {
						nad.Nested(func(sad *netlink.AttributeDecoder) error {
							for sad.Next() {
								if sad.Type() == sockFD {
									fds = append(fds, int(sad.Uint32()))
								}
							}
							return nil
						})
					}
					return nil
				})
			}
		}
		if err := ad.Err(); err != nil {
			return nil, err
		}
		// Take references like the kernel, even when refusing, so a test
		// can see what Attach does with its own copies.
		for _, fd := range fds {
			nfd, err := unix.Dup(fd)
			if err != nil {
				k.t.Errorf("CONNECT: socket %d: %v", fd, err)
				return nil, genltest.Error(int(unix.EBADF))
			}
			f := os.NewFile(uintptr(nfd), "kernel-socket")
			c, err := net.FileConn(f)
			f.Close()
			if err != nil {
				k.t.Errorf("CONNECT: socket %d: %v", fd, err)
				return nil, genltest.Error(int(unix.ENOTSOCK))
			}
			k.conns = append(k.conns, c)
		}
		if k.refuse != 0 {
			if !k.keepOnRefuse {
				for _, c := range k.conns {
					c.Close() // the kernel drops its references on failure
				}
				k.conns = nil
			}
			return nil, genltest.Error(int(k.refuse))
		}
		k.connected = true
		return indexReply(CmdConnect, k.index), nil
	case CmdDisconnect:
		k.disconnects++
		k.disconnectLocked()
		return nil, io.EOF
	case CmdStatus:
		return statusReply(DeviceStatus{Index: k.index, Connected: k.connected}), nil
	}
	return nil, genltest.Error(int(unix.EOPNOTSUPP))
}

func (k *fakeKernel) disconnectLocked() {
	for _, c := range k.conns {
		c.Write(nbdproto.Request{Type: nbdproto.CmdDisc}.Append(nil, false))
		c.Close()
	}
	k.conns = nil
	k.connected = false
}

// read issues one NBD_CMD_READ as the kernel does (simple replies only).
func kernelRead(c net.Conn, cookie uint64, p []byte, off uint64) error {
	req := nbdproto.Request{Type: nbdproto.CmdRead, Cookie: cookie, Offset: off, Length: uint64(len(p))}
	if _, err := c.Write(req.Append(nil, false)); err != nil {
		return err
	}
	var rep [16]byte
	if _, err := io.ReadFull(c, rep[:]); err != nil {
		return err
	}
	if m := binary.BigEndian.Uint32(rep[0:]); m != nbdproto.SimpleReplyMagic {
		return fmt.Errorf("reply magic %#x: not a simple reply", m)
	}
	if e := binary.BigEndian.Uint32(rep[4:]); e != 0 {
		return fmt.Errorf("read error %d", e)
	}
	if got := binary.BigEndian.Uint64(rep[8:]); got != cookie {
		return fmt.Errorf("cookie %d, want %d", got, cookie)
	}
	_, err := io.ReadFull(c, p)
	return err
}

// testImage builds a qcow2 chain with qemu-img/qemu-io and returns the
// overlay's path and its raw content as qemu-img converts it.
func testImage(t *testing.T) (string, []byte) {
	t.Helper()
	for _, tool := range []string{"qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed", tool)
		}
	}
	dir := t.TempDir()
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
	}
	base, top, raw := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2"), filepath.Join(dir, "raw")
	run("qemu-img", "create", "-q", "-f", "qcow2", base, "4M")
	run("qemu-io", "-c", "write -P 0x61 0 1M", "-c", "write -P 0x62 3M 512k", base)
	run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
	run("qemu-io", "-c", "write -P 0x63 512k 1M", "-c", "write -z 3M 64k", top)
	run("qemu-img", "convert", "-O", "raw", top, raw)
	want, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	return top, want
}

func openImage(t *testing.T, path string) *qcow2.Image {
	t.Helper()
	return openImageMode(t, path, false)
}

func openImageMode(t *testing.T, path string, writable bool) *qcow2.Image {
	t.Helper()
	img, err := qcow2.Open(path, qcow2.Options{Writable: writable})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() })
	return img
}

// stopAndWait ends an attachment as how says ("detach": DISCONNECT of
// device index; "signal": its context is cancelled, as on SIGTERM) and
// checks that Wait returns without error within limit.
func stopAndWait(t *testing.T, a *Attachment, c *Conn, how string, index int, limit time.Duration) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- a.Wait(ctx) }()
	switch how {
	case "detach":
		if err := c.Disconnect(index); err != nil {
			t.Fatal(err)
		}
	case "signal":
		cancel()
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Wait after %s: %v", how, err)
		}
	case <-time.After(limit):
		t.Fatalf("Wait did not return within %v of the %s", limit, how)
	}
}

func fakeKernelConn(t *testing.T, k *fakeKernel) *Conn {
	t.Helper()
	gc := genltest.Dial(genltest.ServeFamily(fakeFamily, k.serve))
	c, err := newConn(gc, nil, func() error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestAttachLocal(t *testing.T) {
	path, want := testImage(t)
	tests := []struct {
		name        string
		connections int
		stop        string // "detach": nbdgw detach; "signal": ctx cancelled
	}{
		{"one connection, detach", 1, "detach"},
		{"three connections, detach", 3, "detach"},
		{"two connections, signal", 2, "signal"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := &fakeKernel{t: t, index: 5}
			c := fakeKernelConn(t, k)
			a, err := Attach(context.Background(), c, AttachConfig{
				Image: openImage(t, path), Name: path, Index: AnyIndex, Connections: tt.connections,
			})
			if err != nil {
				t.Fatal(err)
			}
			if a.Index != 5 || a.Path() != "/dev/nbd5" {
				t.Errorf("device %d %s, want 5 /dev/nbd5", a.Index, a.Path())
			}
			k.mu.Lock()
			conns, size, flags, backend := k.conns, k.size, k.serverFlags, k.backend
			k.mu.Unlock()
			if len(conns) != tt.connections {
				t.Fatalf("kernel got %d sockets, want %d", len(conns), tt.connections)
			}
			if size != uint64(len(want)) {
				t.Errorf("size %d, want %d", size, len(want))
			}
			if flags&uint64(nbdproto.FlagHasFlags|nbdproto.FlagReadOnly) != uint64(nbdproto.FlagHasFlags|nbdproto.FlagReadOnly) {
				t.Errorf("server flags %#x lack HAS_FLAGS|READ_ONLY", flags)
			}
			if tt.connections > 1 && flags&uint64(nbdproto.FlagCanMultiConn) == 0 {
				t.Errorf("server flags %#x lack CAN_MULTI_CONN", flags)
			}
			if backend != "nbdgw:"+path {
				t.Errorf("backend %q, want nbdgw:%s", backend, path)
			}

			// Read the whole device through every connection in parallel,
			// each a different stripe, with simple replies.
			got := make([]byte, len(want))
			const chunk = 256 << 10
			var wg sync.WaitGroup
			errs := make([]error, len(conns))
			for i, conn := range conns {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for off := i * chunk; off < len(got); off += len(conns) * chunk {
						end := min(off+chunk, len(got))
						if err := kernelRead(conn, uint64(off), got[off:end], uint64(off)); err != nil {
							errs[i] = err
							return
						}
					}
				}()
			}
			wg.Wait()
			if err := errors.Join(errs...); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Error("device content differs from qemu-img convert's")
			}

			stopAndWait(t, a, c, tt.stop, 5, 10*time.Second)
			k.mu.Lock()
			defer k.mu.Unlock()
			if k.connected || k.disconnects != 1 {
				t.Errorf("after Wait: connected %v, %d DISCONNECTs; want false, 1", k.connected, k.disconnects)
			}
		})
	}
}

func TestAttachErrors(t *testing.T) {
	path, _ := testImage(t)
	tests := []struct {
		name        string
		cfg         AttachConfig
		refuse      unix.Errno
		wantConnect bool
		wantIs      error
		wantText    string
	}{
		{"busy", AttachConfig{Index: 0}, unix.EBUSY, true, ErrBusy, "busy"},
		{"kernel refuses", AttachConfig{Index: AnyIndex}, unix.EINVAL, true, unix.EINVAL, "refused"},
		{"writable, image opened read-only", AttachConfig{Index: AnyIndex, Writable: true}, 0, false, nil, "opened read-only"},
		{"read-only, image opened writable", AttachConfig{Index: AnyIndex}, 0, false, nil, "opened writable"},
		{"too many connections", AttachConfig{Index: AnyIndex, Connections: maxConnections + 1}, 0, false, nil, "--connections"},
		{"refused URI", AttachConfig{Index: AnyIndex, URI: "nbd://127.0.0.1:1/"}, 0, false, unix.ECONNREFUSED, "refused"},
		{"TLS credentials, plain URI", AttachConfig{Index: AnyIndex, URI: "nbd://127.0.0.1:1/", TLSCreds: "/nonexistent"}, 0, false, nil, "plain URI"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := &fakeKernel{t: t, index: 0, refuse: tt.refuse}
			c := fakeKernelConn(t, k)
			cfg := tt.cfg
			if cfg.URI == "" {
				// The image is opened the other way round from what the
				// attach asks for in the mismatch cases.
				mismatch := bytes.Contains([]byte(tt.name), []byte("image opened"))
				cfg.Image = openImageMode(t, path, cfg.Writable != mismatch)
			}
			a, err := Attach(context.Background(), c, cfg)
			if err == nil {
				t.Fatalf("Attach succeeded: %s", a.Path())
			}
			if tt.wantIs != nil && !errors.Is(err, tt.wantIs) {
				t.Errorf("error %v is not %v", err, tt.wantIs)
			}
			if !bytes.Contains([]byte(err.Error()), []byte(tt.wantText)) {
				t.Errorf("error %q does not mention %q", err, tt.wantText)
			}
			k.mu.Lock()
			defer k.mu.Unlock()
			if (k.connectCalls > 0) != tt.wantConnect {
				t.Errorf("CONNECT sent %d times", k.connectCalls)
			}
			if k.connected {
				t.Error("device left connected")
			}
		})
	}
}

// TestAttachRefusedClosesServer checks that a refused CONNECT leaves no
// server connection behind: a socket reference the kernel still holds
// sees the in-process server hang up.
func TestAttachRefusedClosesServer(t *testing.T) {
	path, _ := testImage(t)
	k := &fakeKernel{t: t, refuse: unix.EBUSY, keepOnRefuse: true}
	c := fakeKernelConn(t, k)
	if _, err := Attach(context.Background(), c, AttachConfig{Image: openImage(t, path), Index: 0}); !errors.Is(err, ErrBusy) {
		t.Fatalf("Attach: %v, want ErrBusy", err)
	}
	k.mu.Lock()
	kept := k.conns
	k.mu.Unlock()
	if len(kept) != 1 {
		t.Fatalf("kernel kept %d sockets", len(kept))
	}
	defer kept[0].Close()
	kept[0].SetReadDeadline(time.Now().Add(5 * time.Second))
	var b [1]byte
	if n, err := kept[0].Read(b[:]); err != io.EOF {
		t.Errorf("kernel side read %d bytes, %v; want EOF (server closed)", n, err)
	}
}

// TestAttachURI hands a connection to a writable qemu-nbd export to the
// fake kernel: the handshake must leave simple replies (the kernel reads
// with them) and attach must add the read-only flag unless --writable.
func TestAttachURI(t *testing.T) {
	path, want := testImage(t)
	if _, err := exec.LookPath("qemu-nbd"); err != nil {
		t.Skip("qemu-nbd not installed")
	}
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	srv := exec.Command("qemu-nbd", "--persistent", "--shared=4", "-f", "qcow2", "-k", sock, path)
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Process.Kill(); srv.Wait() })
	for i := 0; i < 100; i++ {
		if c, err := net.Dial("unix", sock); err == nil { // listening, not merely bound
			c.Close()
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	uri := "nbd+unix:///?socket=" + sock
	for _, writable := range []bool{false, true} {
		t.Run(fmt.Sprintf("writable=%v", writable), func(t *testing.T) {
			k := &fakeKernel{t: t, index: 1}
			c := fakeKernelConn(t, k)
			var logs []string
			a, err := Attach(context.Background(), c, AttachConfig{
				URI: uri, Name: uri, Index: AnyIndex, Writable: writable,
				Logf: func(f string, args ...any) { logs = append(logs, fmt.Sprintf(f, args...)) },
			})
			if err != nil {
				t.Fatal(err)
			}
			k.mu.Lock()
			conns, flags, size, backend := k.conns, k.serverFlags, k.size, k.backend
			k.mu.Unlock()
			if got := flags&uint64(nbdproto.FlagReadOnly) != 0; got == writable {
				t.Errorf("server flags %#x: read-only %v with writable=%v", flags, got, writable)
			}
			if size != uint64(len(want)) || backend != "nbdgw:"+uri {
				t.Errorf("size %d backend %q, want %d nbdgw:%s", size, backend, len(want), uri)
			}
			got := make([]byte, len(want))
			for off := 0; off < len(got); off += 1 << 20 {
				if err := kernelRead(conns[0], uint64(off), got[off:off+1<<20], uint64(off)); err != nil {
					t.Fatal(err)
				}
			}
			if !bytes.Equal(got, want) {
				t.Error("content read through the handed-over connection differs from qemu-img convert's")
			}
			// genltest cannot join multicast groups: attach goes on without
			// LINK_DEAD and says so.
			if len(logs) == 0 {
				t.Error("no warning about the missing LINK_DEAD watcher")
			}
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			if err := a.Wait(ctx); err != nil {
				t.Errorf("Wait: %v", err)
			}
			k.mu.Lock()
			defer k.mu.Unlock()
			if k.connected {
				t.Error("still connected after Wait")
			}
		})
	}
}
