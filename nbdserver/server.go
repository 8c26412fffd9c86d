package nbdserver

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime/debug"
	"sync"
	"syscall"
	"time"

	"github.com/nbdgw/nbdgw/internal/gnutlspsk"
	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
	"github.com/nbdgw/nbdgw/qcow2"
)

// Export is one named image the server offers.
type Export struct {
	Name, Description string
	Image             *qcow2.Image
	// Writable says the image was opened writable: the export advertises
	// and accepts WRITE, TRIM, WRITE_ZEROES (FAST_ZERO, NO_HOLE), FUA and
	// FLUSH. Without it those commands answer NBD_EPERM.
	Writable bool
}

// ExportInfo is one NBD_OPT_LIST entry.
type ExportInfo struct{ Name, Description string }

// Config configures a Server. Zero limits take the defaults below.
type Config struct {
	Exports []*Export // the first one is the default export ("" maps to it)
	// Lookup, if set, finds at connect time an export not in Exports
	// (NBD_OPT_EXPORT_NAME, INFO, GO, LIST/SET_META_CONTEXT). It returns
	// the export and a release func, called once when the connection no
	// longer uses it (at the end of the handshake for exports only
	// queried, at disconnect for the one served). An error is sent to the
	// client as NBD_REP_ERR_UNKNOWN with its text; Lookup must not return
	// (nil, nil, nil).
	Lookup func(name string) (exp *Export, release func(), err error)
	// List, if set, answers NBD_OPT_LIST after Exports.
	List func() []ExportInfo
	TLS  *tls.Config // nil: no STARTTLS
	// PSK, instead of TLS, makes STARTTLS a TLS-PSK handshake (GnuTLS,
	// see internal/gnutlspsk) with these keys.
	PSK         *gnutlspsk.Keys
	TLSRequired bool                             // with TLS or PSK
	Logf        func(format string, args ...any) // nil: discard
	// Log, if set, receives one record per client event (connected,
	// negotiated, disconnected), for nbdgw serve -v.
	Log *slog.Logger

	MaxConnections     int           // concurrent connections; beyond, new ones wait in the listen backlog (DefaultMaxConnections)
	MaxPerAddress      int           // connections from one client IP address still in the handshake (DefaultMaxPerAddress); -1: no limit
	MaxInFlight        int           // requests in flight per connection (DefaultMaxInFlight)
	MaxRequest         int           // largest READ/WRITE payload (DefaultMaxRequest)
	HandshakeTimeout   time.Duration // whole option haggling (DefaultHandshakeTimeout)
	MaxBufferBytes     int64         // buffers held by requests in flight, shared by all connections (DefaultMaxBufferBytes)
	MaxConnBufferBytes int64         // the same, per connection (DefaultMaxConnBufferBytes); its first 256 KiB do not come from MaxBufferBytes (budget.go)
	SendTimeout        time.Duration // longest a reply may take to be taken by the client (DefaultSendTimeout)
}

// Defaults of the Config limits.
const (
	DefaultMaxConnections     = 4096
	DefaultMaxPerAddress      = 64
	DefaultMaxInFlight        = 16
	DefaultMaxRequest         = 32 << 20         // like QEMU's NBD_MAX_BUFFER_SIZE
	DefaultHandshakeTimeout   = 10 * time.Second // as qemu-nbd's --handshake-limit
	DefaultMaxBufferBytes     = 128 << 20
	DefaultMaxConnBufferBytes = 2 * DefaultMaxRequest
	DefaultSendTimeout        = time.Minute
)

// Server serves exports over NBD. It is safe for concurrent use.
type Server struct {
	cfg  Config
	slot chan struct{} // one token per open connection
	mem  *memBudget    // bytes of request buffers, server-wide

	mu          sync.Mutex // guards listeners, conns, closed, handshaking
	listeners   map[net.Listener]struct{}
	conns       map[net.Conn]struct{}
	closed      bool
	done        chan struct{}  // closed by Close
	handshaking map[string]int // connections in the handshake by client IP

	wg sync.WaitGroup // connections being served
}

// ErrServerClosed is returned by Serve after Close.
var ErrServerClosed = errors.New("nbd: server closed")

// NewServer returns a server for cfg.
func NewServer(cfg Config) *Server {
	if cfg.Logf == nil {
		cfg.Logf = func(string, ...any) {}
	}
	if cfg.MaxConnections <= 0 {
		cfg.MaxConnections = DefaultMaxConnections
	}
	if cfg.MaxPerAddress == 0 {
		cfg.MaxPerAddress = DefaultMaxPerAddress
	}
	if cfg.MaxInFlight <= 0 {
		cfg.MaxInFlight = DefaultMaxInFlight
	}
	if cfg.MaxRequest <= 0 {
		cfg.MaxRequest = DefaultMaxRequest
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if cfg.MaxBufferBytes <= 0 {
		cfg.MaxBufferBytes = DefaultMaxBufferBytes
	}
	if cfg.MaxConnBufferBytes <= 0 {
		cfg.MaxConnBufferBytes = DefaultMaxConnBufferBytes
	}
	cfg.MaxConnBufferBytes = max(cfg.MaxConnBufferBytes, int64(cfg.MaxRequest))
	cfg.MaxBufferBytes = max(cfg.MaxBufferBytes, cfg.MaxConnBufferBytes)
	if cfg.SendTimeout <= 0 {
		cfg.SendTimeout = DefaultSendTimeout
	}
	return &Server{
		cfg:       cfg,
		mem:       newMemBudget(cfg.MaxBufferBytes),
		slot:      make(chan struct{}, cfg.MaxConnections),
		listeners: map[net.Listener]struct{}{},
		conns:     map[net.Conn]struct{}{},
		done:      make(chan struct{}),

		handshaking: map[string]int{},
	}
}

// Serve accepts connections on l until ctx is done or Close is called.
// It closes l.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	if !s.track(l) {
		l.Close()
		return ErrServerClosed
	}
	defer s.untrack(l)
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	for {
		// Over the connection limit the server stops accepting: new
		// connections wait in the kernel's listen backlog, as with
		// qemu-nbd, rather than being closed.
		select {
		case s.slot <- struct{}{}:
		case <-ctx.Done():
			return ctx.Err()
		case <-s.done:
			return ErrServerClosed
		}
		c, err := l.Accept()
		if err != nil {
			<-s.slot
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if s.isClosed() {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			return err
		}
		go func() {
			defer func() { <-s.slot }()
			s.ServeConn(ctx, c)
		}()
	}
}

// clientIP is the address the per-address limit counts c under; "" for
// connections without one (unix sockets).
func clientIP(c net.Conn) string {
	if a, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		return a.IP.String()
	}
	return ""
}

// admit counts c as handshaking under its client address, or reports
// that its address already has MaxPerAddress handshakes in progress.
func (s *Server) admit(ip string) bool {
	if ip == "" || s.cfg.MaxPerAddress < 0 {
		return true
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.handshaking[ip] >= s.cfg.MaxPerAddress {
		return false
	}
	s.handshaking[ip]++
	return true
}

// handshakeDone ends what admit counted.
func (s *Server) handshakeDone(ip string) {
	if ip == "" || s.cfg.MaxPerAddress < 0 {
		return
	}
	s.mu.Lock()
	if s.handshaking[ip]--; s.handshaking[ip] <= 0 {
		delete(s.handshaking, ip)
	}
	s.mu.Unlock()
}

// ServeConn runs the handshake and the transmission phase on c and
// closes c when done. When ctx is done or the server closes, it stops
// reading requests, lets the requests in flight answer (for up to
// drainTimeout) and closes c.
func (s *Server) ServeConn(ctx context.Context, c net.Conn) {
	if !s.trackConn(c) {
		c.Close()
		return
	}
	defer s.untrackConn(c)
	defer c.Close()
	defer func() {
		if p := recover(); p != nil { // in the handshake: drop this client only
			s.cfg.Logf("nbd: %v: panic: %v\n%s", c.RemoteAddr(), p, debug.Stack())
		}
	}()
	stop := context.AfterFunc(ctx, func() { stopConn(c) })
	defer stop()

	ip := clientIP(c)
	if !s.admit(ip) {
		s.cfg.Logf("nbd: %v: %d connections from %s already in the handshake, refusing", c.RemoteAddr(), s.cfg.MaxPerAddress, ip)
		return
	}
	inHandshake := true
	defer func() { // also after a panic in the handshake
		if inHandshake {
			s.handshakeDone(ip)
		}
	}()
	n := &negotiation{srv: s, conn: c}
	defer n.release(nil) // also after a panic in the handshake
	defer func() {
		if n.conn != c {
			n.conn.Close() // shuts TLS down cleanly (close_notify)
		}
	}()
	start := time.Now()
	s.verbose("client connected", "client", c.RemoteAddr())
	sess, err := n.run()
	inHandshake = false
	s.handshakeDone(ip)
	if sess != nil {
		n.release(sess.exp) // exports only queried in the handshake
	}
	stopping := func() bool { return ctx.Err() != nil || s.isClosed() }
	if err != nil {
		if !stopping() && !errors.Is(err, errAborted) && !clientLeft(err) {
			s.cfg.Logf("nbd: %v: handshake: %v", c.RemoteAddr(), err)
		}
		s.verbose("client left in the handshake", "client", c.RemoteAddr(), "error", err)
		return
	}
	if stopping() { // the stop may have raced with the handshake's end
		return
	}
	s.verbose("client negotiated", "client", c.RemoteAddr(), "export", sess.exp.Name,
		"mode", sess.mode.String(), "tls", n.conn != c, "contexts", sess.contexts)
	err = sess.serve()
	if err != nil && !stopping() {
		s.cfg.Logf("nbd: %v: %v", c.RemoteAddr(), err)
	}
	s.verbose("client disconnected", "client", c.RemoteAddr(), "seconds", time.Since(start).Seconds(), "error", err)
}

// verbose logs a client event to Config.Log, if set.
func (s *Server) verbose(msg string, args ...any) {
	if s.cfg.Log != nil {
		s.cfg.Log.Info(msg, args...)
	}
}

// clientLeft reports an error that only says the client went away
// (closed before or during the handshake): not worth a log line.
func clientLeft(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET)
}

// drainTimeout bounds how long a stopping connection may take to send the
// replies in flight.
const drainTimeout = 5 * time.Second

// stopConn makes the connection's reader fail at once and bounds its
// remaining writes; ServeConn then waits for the requests in flight and
// closes it.
func stopConn(c net.Conn) {
	c.SetReadDeadline(time.Unix(1, 0))
	c.SetWriteDeadline(time.Now().Add(drainTimeout))
}

// Close stops all listeners, stops reading requests on every connection,
// waits for the replies in flight and closes the connections.
func (s *Server) Close() error {
	s.mu.Lock()
	if !s.closed {
		close(s.done)
	}
	s.closed = true
	for l := range s.listeners {
		l.Close()
	}
	for c := range s.conns {
		stopConn(c)
	}
	s.mu.Unlock()
	s.wg.Wait()
	return nil
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

func (s *Server) track(l net.Listener) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.listeners[l] = struct{}{}
	return true
}

func (s *Server) untrack(l net.Listener) {
	s.mu.Lock()
	delete(s.listeners, l)
	s.mu.Unlock()
}

func (s *Server) trackConn(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	return true
}

func (s *Server) untrackConn(c net.Conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	s.wg.Done()
}

// export finds an export of Exports by name; "" is the default export.
func (s *Server) export(name string) *Export {
	if len(s.cfg.Exports) == 0 {
		return nil
	}
	if name == "" {
		return s.cfg.Exports[0]
	}
	for _, e := range s.cfg.Exports {
		if e.Name == name {
			return e
		}
	}
	return nil
}

// transmissionFlags returns the flags advertised for exp in mode. payload
// says whether NBD_FLAG_BLOCK_STATUS_PAYLOAD may be set.
func transmissionFlags(exp *Export, mode nbdproto.ReplyMode, payload bool) nbdproto.Flags {
	f := nbdproto.FlagHasFlags | nbdproto.FlagSendFlush | nbdproto.FlagCanMultiConn | nbdproto.FlagSendCache
	if exp.Writable {
		f |= nbdproto.FlagSendFUA | nbdproto.FlagSendTrim | nbdproto.FlagSendWriteZeroes | nbdproto.FlagSendFastZero
	} else {
		f |= nbdproto.FlagReadOnly
	}
	if mode >= nbdproto.ModeStructured {
		f |= nbdproto.FlagSendDF
	}
	if mode == nbdproto.ModeExtended && payload {
		f |= nbdproto.FlagBlockStatusPayload
	}
	return f
}

func (e *Export) String() string { return fmt.Sprintf("export %q", e.Name) }

// MaxStringLen is the protocol's limit on export names and descriptions
// (NBD_MAX_STRING_SIZE, nbd-proto.md "Export name and description").
const MaxStringLen = 4096

// Validate checks what a client could not negotiate at all: export names
// and descriptions over MaxStringLen bytes (qemu-nbd refuses them at start
// too: "export name '...' too long") and names given twice.
func (cfg *Config) Validate() error {
	if cfg.TLS != nil && cfg.PSK != nil {
		return errors.New("TLS certificates and TLS-PSK exclude each other")
	}
	seen := map[string]bool{}
	for _, e := range cfg.Exports {
		if len(e.Name) > MaxStringLen {
			return fmt.Errorf("export name %s too long: %d bytes, at most %d", clipQuote(e.Name), len(e.Name), MaxStringLen)
		}
		if len(e.Description) > MaxStringLen {
			return fmt.Errorf("export description %s too long: %d bytes, at most %d", clipQuote(e.Description), len(e.Description), MaxStringLen)
		}
		if seen[e.Name] {
			return fmt.Errorf("export name %q given twice", e.Name)
		}
		seen[e.Name] = true
	}
	return nil
}

// clipQuote quotes the start of a long string for a one-line message.
func clipQuote(s string) string {
	if len(s) > 40 {
		return fmt.Sprintf("%q...", s[:40])
	}
	return fmt.Sprintf("%q", s)
}
