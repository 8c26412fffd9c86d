package kernel

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nbdgw/nbdgw/nbdserver"
	"github.com/nbdgw/nbdgw/nbdserver/nbdclient"
	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
	"github.com/nbdgw/nbdgw/qcow2"
)

// AttachConfig says what to attach and how.
type AttachConfig struct {
	// Image is served in-process over socketpairs; it must have been
	// opened writable (qcow2.Options.Writable) exactly when Writable is
	// set. The caller closes it after Wait, which flushes it. Or:
	Image *qcow2.Image
	// URI names a remote NBD export (nbd://, nbd+unix://) whose
	// connections are handed to the kernel after the handshake. For
	// nbds:// and nbds+unix:// TLS is terminated in-process and the
	// kernel gets one end of a socketpair relayed to the TLS connection.
	URI string
	// TLSCreds is a directory of X.509 credentials for nbds (ca-cert.pem,
	// optional client-cert.pem and client-key.pem, as
	// nbdproto.LoadClientTLS reads them); default: the URI's
	// tls-certificates. TLSPSK is instead a key file of username:hexkey
	// lines; the username is the URI's user part (default "qemu").
	TLSCreds, TLSPSK string
	// Name identifies the backend in /sys/block/nbdN/backend as
	// "nbdgw:Name" (the image path or the URI).
	Name string
	// Index is the device number, or AnyIndex.
	Index int
	// Connections is the number of sockets serving the device (default 1).
	Connections int
	// Writable leaves the read-only flag off. For a local image the
	// in-process server then advertises and accepts writes, trims, write
	// zeroes, FUA and flushes (the kernel's FLUSH flushes the image).
	Writable bool
	// Timeout is the per-request timeout (0: kernel default).
	Timeout time.Duration
	// DeadConnTimeout is how long I/O waits for a dead remote connection
	// to be replaced (URI only; default 60s).
	DeadConnTimeout time.Duration
	// Logf reports reconnections and server errors; nil discards.
	Logf func(format string, args ...any)
}

// BackendPrefix starts the backend identifier of devices attached by nbdgw.
const BackendPrefix = "nbdgw:"

// maxConnections bounds --connections.
const maxConnections = 64

// handshakeTimeout bounds each client handshake.
const handshakeTimeout = 30 * time.Second

// pollInterval is how often Wait checks that the device is still ours.
const pollInterval = 500 * time.Millisecond

// Attachment is a device attached by Attach.
type Attachment struct {
	Index int // N of /dev/nbdN

	c       *Conn
	cfg     AttachConfig
	backend string
	srv     *nbdserver.Server // local image only
	cancel  context.CancelFunc
	served  chan struct{}     // closed when all local server connections ended; nil for a URI
	wg      sync.WaitGroup    // local server connections
	watcher *Watcher          // URI only
	opts    nbdclient.Options // handshake options of every remote connection
	tls     bool              // the URI is nbds: connections are relayed
	relays  relays
	// connector is /sys/block/nbdN/pid right after CONNECT: the kernel
	// records the thread that sent CONNECT (a thread id, not our pid).
	connector int
}

// Path returns /dev/nbdN.
func (a *Attachment) Path() string { return DevicePath(a.Index) }

// Attach negotiates cfg.Connections connections without structured
// replies or extended headers (the kernel driver understands simple
// replies only) and hands them to the kernel with CONNECT. On error no
// device is left configured and nothing keeps serving.
func Attach(ctx context.Context, c *Conn, cfg AttachConfig) (*Attachment, error) {
	fail := func(err error) (*Attachment, error) {
		return nil, &Error{Op: "attach", Index: normIndex(cfg.Index), Err: err}
	}
	cfg, err := checkConfig(c, cfg)
	if err != nil {
		return fail(err)
	}
	a := &Attachment{Index: -1, c: c, cfg: cfg, backend: BackendPrefix + cfg.Name}
	serveCtx, cancel := context.WithCancel(context.Background())
	a.cancel = cancel

	var (
		clients []*nbdclient.Client
		kconns  []net.Conn // what the kernel gets, one per client
	)
	if cfg.Image != nil {
		a.served = make(chan struct{})
		clients, err = a.serveLocal(ctx, serveCtx)
		for _, cl := range clients {
			kconns = append(kconns, cl.Conn())
		}
	} else {
		clients, kconns, err = a.dialAll(ctx)
	}
	// Our copies of the kernel's ends go in every case: after CONNECT the
	// kernel holds its own references (closing does not shut a socket
	// down), after a failure nobody needs them.
	defer func() {
		for _, kc := range kconns {
			kc.Close()
		}
	}()
	var size int64
	var flags uint64
	if err == nil {
		size, flags, err = exportOf(clients, cfg.Connections)
	}
	if err != nil {
		a.shutdown()
		return fail(err)
	}
	if !cfg.Writable {
		flags |= uint64(nbdproto.FlagReadOnly)
	} else if flags&uint64(nbdproto.FlagReadOnly) != 0 {
		if cfg.Image != nil {
			a.shutdown()
			return fail(fmt.Errorf("the in-process server offers the image read-only (flags %#x)", flags))
		}
		cfg.Logf("%s: the server offers the export read-only; the device will be read-only", cfg.URI)
	}
	if cfg.URI != "" {
		// Without the multicast group the device still works; only a dead
		// connection cannot be replaced.
		if a.watcher, err = c.WatchLinkDead(); err != nil {
			cfg.Logf("%v: a dead connection will not be replaced", err)
		}
	}
	conns := make([]syscall.RawConn, len(kconns))
	for i, kc := range kconns {
		if conns[i], err = rawConn(kc); err != nil {
			a.shutdown()
			return fail(err)
		}
	}
	// Hold every descriptor open (inside Control) while the kernel takes
	// its references during CONNECT.
	idx, err := withFDs(conns, func(fds []int) (int, error) {
		return c.Connect(ConnectConfig{
			Index:             cfg.Index,
			Size:              uint64(size),
			ServerFlags:       flags,
			Timeout:           cfg.Timeout,
			DeadConnTimeout:   cfg.DeadConnTimeout,
			Sockets:           fds,
			BackendIdentifier: a.backend,
		})
	}, nil)
	if err != nil {
		a.shutdown()
		return nil, err // already an *Error of Connect
	}
	a.Index = idx
	a.connector = deviceInfo(idx).PID
	return a, nil
}

// checkConfig validates cfg, fills in defaults and refuses a device that
// is out of range or busy before anything is served.
func checkConfig(c *Conn, cfg AttachConfig) (AttachConfig, error) {
	if cfg.Connections == 0 {
		cfg.Connections = 1
	}
	if cfg.Connections < 0 || cfg.Connections > maxConnections {
		return cfg, fmt.Errorf("--connections %d: want 1..%d", cfg.Connections, maxConnections)
	}
	if (cfg.Image == nil) == (cfg.URI == "") {
		return cfg, errors.New("need exactly one of an image and an NBD URI")
	}
	if cfg.Image != nil && cfg.Writable != cfg.Image.Writable() {
		if cfg.Writable {
			return cfg, errors.New("--writable: the image was opened read-only")
		}
		// Never leave a chain file open for writing behind a read-only
		// device.
		return cfg, errors.New("the image was opened writable for a read-only attach")
	}
	if cfg.Logf == nil {
		cfg.Logf = func(string, ...any) {}
	}
	if cfg.URI != "" && cfg.DeadConnTimeout == 0 {
		cfg.DeadConnTimeout = 60 * time.Second
	}
	if cfg.Index >= 0 {
		if max, ok := MaxIndex(); ok && cfg.Index > max {
			return cfg, fmt.Errorf("%w: the driver allows /dev/nbd0../dev/nbd%d", ErrIndexRange, max)
		}
		if d, err := c.Status(cfg.Index); err == nil && len(d) == 1 && d[0].Connected {
			return cfg, ErrBusy
		}
	}
	return cfg, nil
}

// exportOf returns the size and transmission flags the connections agree
// on, and refuses what the kernel could not use.
func exportOf(clients []*nbdclient.Client, want int) (int64, uint64, error) {
	if len(clients) != want || want == 0 {
		return 0, 0, fmt.Errorf("%d of %d connections negotiated", len(clients), want)
	}
	size, flags := clients[0].Size(), clients[0].TransmissionFlags()
	for _, cl := range clients[1:] {
		if cl.Size() != size || cl.TransmissionFlags() != flags {
			return 0, 0, fmt.Errorf("the connections disagree on the export (size %d flags %#x vs size %d flags %#x)",
				size, uint16(flags), cl.Size(), uint16(cl.TransmissionFlags()))
		}
	}
	if want > 1 && flags&nbdproto.FlagCanMultiConn == 0 {
		return 0, 0, errors.New("the server does not allow multiple connections (no NBD_FLAG_CAN_MULTI_CONN); use --connections 1")
	}
	if size <= 0 {
		return 0, 0, fmt.Errorf("export size is %d: nothing to attach", size)
	}
	return size, uint64(flags), nil
}

func normIndex(i int) int {
	if i < 0 {
		return -1
	}
	return i
}

// serveLocal starts one in-process server connection per socketpair and
// returns the negotiated client ends.
func (a *Attachment) serveLocal(ctx, serveCtx context.Context) ([]*nbdclient.Client, error) {
	a.srv = nbdserver.NewServer(nbdserver.Config{
		Exports: []*nbdserver.Export{{Name: "", Image: a.cfg.Image, Writable: a.cfg.Writable}},
		Logf:    a.cfg.Logf,
	})
	var clients []*nbdclient.Client
	defer func() {
		go func() { a.wg.Wait(); close(a.served) }()
	}()
	for i := 0; i < a.cfg.Connections; i++ {
		srvEnd, cliEnd, err := socketpair()
		if err != nil {
			return clients, err
		}
		a.wg.Add(1)
		go func() {
			defer a.wg.Done()
			a.srv.ServeConn(serveCtx, srvEnd)
		}()
		hctx, cancel := context.WithTimeout(ctx, handshakeTimeout)
		cl, err := nbdclient.New(hctx, cliEnd, nbdclient.Options{})
		cancel()
		if err != nil {
			return clients, fmt.Errorf("handshake with the in-process server: %w", err)
		}
		clients = append(clients, cl)
	}
	return clients, nil
}

// socketpair returns both ends of a unix stream socketpair as net.Conns.
func socketpair() (net.Conn, net.Conn, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, os.NewSyscallError("socketpair", err)
	}
	var conns [2]net.Conn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), fmt.Sprintf("socketpair-%d", i))
		c, err := net.FileConn(f) // dups fd
		f.Close()
		if err != nil {
			if i == 1 {
				conns[0].Close()
			} else {
				unix.Close(fds[1])
			}
			return nil, nil, err
		}
		conns[i] = c
	}
	return conns[0], conns[1], nil
}

// dialAll opens cfg.Connections connections to cfg.URI and returns the
// clients and the connections to hand to the kernel.
func (a *Attachment) dialAll(ctx context.Context) ([]*nbdclient.Client, []net.Conn, error) {
	u, err := nbdproto.ParseURI(a.cfg.URI)
	if err != nil {
		return nil, nil, err
	}
	a.tls = u.TLS
	if a.opts, err = clientOptions(a.cfg); err != nil {
		return nil, nil, err
	}
	var (
		clients []*nbdclient.Client
		kconns  []net.Conn
	)
	for i := 0; i < a.cfg.Connections; i++ {
		cl, kc, err := a.dialOne(ctx)
		if err != nil {
			return clients, kconns, err
		}
		clients, kconns = append(clients, cl), append(kconns, kc)
	}
	return clients, kconns, nil
}

// dialOne connects and negotiates once with a.opts (a fresh TLS
// handshake for nbds) and returns the client and the connection for the
// kernel: the client's own, or for nbds the kernel's end of a relay.
func (a *Attachment) dialOne(ctx context.Context) (*nbdclient.Client, net.Conn, error) {
	hctx, cancel := context.WithTimeout(ctx, handshakeTimeout)
	defer cancel()
	cl, err := nbdclient.Dial(hctx, a.cfg.URI, a.opts)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", a.cfg.URI, err)
	}
	if !a.tls {
		return cl, cl.Conn(), nil
	}
	kc, err := a.relays.start(cl.Conn())
	if err != nil {
		return nil, nil, err
	}
	return cl, kc, nil
}

func rawConn(c net.Conn) (syscall.RawConn, error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil, fmt.Errorf("connection %T has no file descriptor to hand to the kernel", c)
	}
	return sc.SyscallConn()
}

// withFDs calls fn with the descriptors of conns, each held by its
// RawConn.Control for the duration of the call.
func withFDs(conns []syscall.RawConn, fn func([]int) (int, error), fds []int) (int, error) {
	if len(conns) == 0 {
		return fn(fds)
	}
	var (
		idx  int
		ferr error
	)
	err := conns[0].Control(func(fd uintptr) {
		idx, ferr = withFDs(conns[1:], fn, append(fds, int(fd)))
	})
	if err != nil {
		return -1, err
	}
	return idx, ferr
}

// shutdown stops the local server and waits for its connections.
// drainTimeout bounds how long a detached device's in-process connections
// may take to finish the requests the kernel sent before disconnecting.
const drainTimeout = 30 * time.Second

// drain waits until every in-process connection has ended by itself
// (each ends at NBD_CMD_DISC or EOF, after answering what came before).
func (a *Attachment) drain() {
	if a.served == nil {
		return
	}
	select {
	case <-a.served:
	case <-time.After(drainTimeout):
		a.cfg.Logf("%s: connections still busy %v after the disconnect; stopping them", a.Path(), drainTimeout)
	}
}

func (a *Attachment) shutdown() {
	a.cancel()
	if a.srv != nil {
		a.srv.Close()
	}
	a.wg.Wait()
	a.relays.stop()
	if a.watcher != nil {
		a.watcher.Close()
	}
}

// ours reports whether the device is still connected by this process
// with our backend: after a detach, the index may be reused by someone
// else, whom we must not disconnect.
func (a *Attachment) ours() bool {
	d, err := a.c.Status(a.Index)
	if err != nil || len(d) != 1 || !d[0].Connected {
		return false
	}
	in := deviceInfo(a.Index)
	return in.PID == a.connector && (in.Backend == "" || in.Backend == a.backend)
}

// Wait serves the device until it is disconnected (nbdgw detach) or ctx
// is done; then it disconnects the device if it is still ours and stops
// serving. A remote connection that dies is redialled and handed to the
// kernel with RECONFIGURE.
//
// A writable local image is flushed once every in-process connection has
// answered what it had in flight and stopped; a failing flush is Wait's
// error. The kernel's own flushes (sync, umount, blockdev --flushbufs)
// reach the image through NBD_CMD_FLUSH while the device is attached.
func (a *Attachment) Wait(ctx context.Context) (err error) {
	defer func() {
		a.shutdown()
		if a.cfg.Image == nil || !a.cfg.Writable {
			return
		}
		if ferr := a.cfg.Image.Flush(); ferr != nil && err == nil {
			err = &Error{Op: "flush", Index: a.Index, Err: ferr}
		}
	}()
	dead := make(chan int, 16)
	if a.watcher != nil {
		go func() {
			for {
				idx, err := a.watcher.Next()
				if err != nil {
					return
				}
				if idx == a.Index {
					select {
					case dead <- idx:
					default:
					}
				}
			}
		}()
	}
	tick := time.NewTicker(pollInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return a.detach()
		case <-a.served:
			// Every in-process connection ended: the kernel disconnected,
			// or our server failed; leave nothing half-configured.
			if a.ours() {
				a.cfg.Logf("all connections to %s ended; disconnecting it", a.Path())
				return a.detach()
			}
			return nil
		case <-tick.C:
			if !a.ours() {
				// The kernel let the device go (nbdgw detach). What it
				// sent before NBD_CMD_DISC may still be queued on the
				// sockets: the server must handle all of it before we
				// stop serving, as the spec requires for DISC.
				a.drain()
				return nil
			}
		case <-dead:
			if err := a.reconnect(ctx); err != nil {
				a.cfg.Logf("%s: %v", a.Path(), err)
			}
		}
	}
}

// reconnect replaces a dead remote connection.
func (a *Attachment) reconnect(ctx context.Context) error {
	backoff := 100 * time.Millisecond
	deadline := time.Now().Add(a.cfg.DeadConnTimeout)
	for {
		_, kc, err := a.dialOne(ctx)
		if err == nil {
			rc, rerr := rawConn(kc)
			if rerr != nil {
				kc.Close()
				return rerr
			}
			_, err = withFDs([]syscall.RawConn{rc}, func(fds []int) (int, error) {
				return 0, a.c.Reconfigure(ReconfigureConfig{
					Index:             uint32(a.Index),
					Sockets:           fds,
					BackendIdentifier: a.backend,
				})
			}, nil)
			kc.Close()
			if err == nil {
				a.cfg.Logf("%s: replaced a dead connection to %s", a.Path(), a.cfg.URI)
				return nil
			}
			return fmt.Errorf("reconnect: %w", err)
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("reconnect to %s: %w", a.cfg.URI, err)
		}
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, time.Second)
	}
}

// detach disconnects the device if it is still ours and waits for the
// in-process connections to end.
func (a *Attachment) detach() error {
	var err error
	if a.ours() {
		err = a.c.Disconnect(a.Index)
		if errors.Is(err, ErrNotConnected) || errors.Is(err, ErrNoDevice) {
			err = nil
		}
	}
	if a.served == nil {
		return err
	}
	select {
	case <-a.served:
	case <-time.After(10 * time.Second):
		a.cfg.Logf("%s: connections still open 10s after the disconnect; closing them", a.Path())
	}
	return err
}
