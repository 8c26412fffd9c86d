//go:build cgo

package gnutlspsk

/*
#cgo pkg-config: gnutls
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <gnutls/gnutls.h>

extern int goPSKLookup(uintptr_t h, char *user, unsigned int len, gnutls_datum_t *key);

static int psk_server_cb(gnutls_session_t s, const gnutls_datum_t *user, gnutls_datum_t *key) {
	return goPSKLookup((uintptr_t)gnutls_session_get_ptr(s), (char *)user->data, user->size, key);
}

// psk_set_key hands GnuTLS a copy of a key, in memory it frees itself.
static int psk_set_key(gnutls_datum_t *key, const void *p, unsigned int n) {
	key->data = gnutls_malloc(n);
	if (key->data == NULL)
		return -1;
	memcpy(key->data, p, n);
	key->size = n;
	return 0;
}

static void psk_free(void *p) { gnutls_free(p); }

// psk_ready says whether the socket is readable (or at its end) or
// writable now, without waiting.
static int psk_ready(int fd, int write) {
	struct pollfd p = {fd, write ? POLLOUT : POLLIN, 0};
	return poll(&p, 1, 0) > 0;
}

static gnutls_psk_server_credentials_t psk_server_creds;
static gnutls_priority_t psk_priority;

// psk_global makes the credentials and priority shared by every server
// session (read-only once made, which GnuTLS allows across threads).
static int psk_global(const char *prio) {
	int r = gnutls_psk_allocate_server_credentials(&psk_server_creds);
	if (r < 0)
		return r;
	gnutls_psk_set_server_credentials_function2(psk_server_creds, psk_server_cb);
	r = gnutls_psk_set_server_known_dh_params(psk_server_creds, GNUTLS_SEC_PARAM_MEDIUM);
	if (r < 0)
		return r;
	return gnutls_priority_init(&psk_priority, prio, NULL);
}

// psk_session starts a session over a socket. The socket is non-blocking
// (Go's): operations return GNUTLS_E_AGAIN and Go's poller waits.
// GnuTLS's own handshake timeout is off: the connection's deadlines bound
// the handshake.
static int psk_session(gnutls_session_t *s, int server, int fd, uintptr_t h,
		       gnutls_psk_client_credentials_t ccred) {
	int r = gnutls_init(s, (server ? GNUTLS_SERVER : GNUTLS_CLIENT) | GNUTLS_NO_SIGNAL | GNUTLS_NONBLOCK);
	if (r < 0)
		return r;
	r = gnutls_priority_set(*s, psk_priority);
	if (r >= 0)
		r = gnutls_credentials_set(*s, GNUTLS_CRD_PSK, server ? (void *)psk_server_creds : (void *)ccred);
	if (r < 0) {
		gnutls_deinit(*s);
		return r;
	}
	gnutls_session_set_ptr(*s, (void *)h);
	gnutls_handshake_set_timeout(*s, 0);
	gnutls_transport_set_int(*s, fd);
	return 0;
}

static int psk_client_creds(gnutls_psk_client_credentials_t *c, const char *user, unsigned int ulen,
			    const void *key, unsigned int klen) {
	int r = gnutls_psk_allocate_client_credentials(c);
	if (r < 0)
		return r;
	gnutls_datum_t u = {(unsigned char *)user, ulen}, k = {(unsigned char *)key, klen};
	r = gnutls_psk_set_client_credentials2(*c, &u, &k, GNUTLS_PSK_KEY_RAW);
	if (r < 0)
		gnutls_psk_free_client_credentials(*c);
	return r;
}
*/
import "C"

import (
	"errors"
	"fmt"
	"io"
	"net"
	"runtime/cgo"
	"sync"
	"syscall"
	"time"
	"unsafe"
)

func available() error { return nil }

var (
	globalOnce sync.Once
	globalErr  error
)

func global() error {
	globalOnce.Do(func() {
		p := C.CString(Priority)
		defer C.free(unsafe.Pointer(p))
		if r := C.psk_global(p); r < 0 {
			globalErr = gnutlsError("TLS-PSK: setting up GnuTLS", r)
		}
	})
	return globalErr
}

func gnutlsError(what string, r C.int) error {
	return fmt.Errorf("%s: %s", what, C.GoString(C.gnutls_strerror(r)))
}

// Conn is a TLS-PSK connection over a socket (a *net.TCPConn or
// *net.UnixConn). Read and Write may run at once in two goroutines;
// deadlines are the socket's.
type Conn struct {
	conn net.Conn
	raw  syscall.RawConn
	s    C.gnutls_session_t
	// gmu serializes the GnuTLS calls on s. They never block (the socket
	// is non-blocking; waits are Go's poller's, outside the lock), so a
	// reader and a writer still proceed together. GnuTLS allows one
	// sender and one receiver at once, but a receiver may send too (an
	// alert, the answer to a TLS 1.3 KeyUpdate); with the lock GnuTLS
	// never has two threads in a session.
	gmu  sync.Mutex
	h    cgo.Handle
	user string

	// Set by the server's key lookup during the handshake.
	lookup struct {
		keys    *Keys
		user    string
		unknown bool
	}
	ccred C.gnutls_psk_client_credentials_t

	mu      sync.Mutex
	idle    *sync.Cond
	active  int // Read/Write calls using s
	closing bool
	freed   bool
}

// Server performs the server side of a TLS-PSK handshake on c, looking
// the client's username up in k. On failure the session is freed and c
// is left open for the caller to close.
func (k *Keys) Server(c net.Conn) (net.Conn, error) {
	if err := global(); err != nil {
		return nil, err
	}
	tc, err := newConn(c, true, k, C.gnutls_psk_client_credentials_t(nil))
	if err != nil {
		return nil, err
	}
	if err := tc.handshake(); err != nil {
		if tc.lookup.unknown {
			err = fmt.Errorf("TLS-PSK handshake: unknown username %q", tc.lookup.user)
		} else if tc.lookup.user != "" {
			// In TLS 1.3 a key other than the file's fails the binder
			// check: GnuTLS says "An illegal parameter has been received".
			err = fmt.Errorf("TLS-PSK handshake with username %q (wrong key?): %w", tc.lookup.user, err)
		} else {
			err = fmt.Errorf("TLS-PSK handshake: %w", err)
		}
		tc.free()
		return nil, err
	}
	tc.user = tc.lookup.user
	return tc, nil
}

// Client performs the client side of a TLS-PSK handshake on c.
func Client(c net.Conn, user string, key []byte) (net.Conn, error) {
	if err := global(); err != nil {
		return nil, err
	}
	if user == "" || len(key) == 0 {
		return nil, errors.New("TLS-PSK: empty username or key")
	}
	var cred C.gnutls_psk_client_credentials_t
	u := C.CString(user)
	defer C.free(unsafe.Pointer(u))
	if r := C.psk_client_creds(&cred, u, C.uint(len(user)), unsafe.Pointer(&key[0]), C.uint(len(key))); r < 0 {
		return nil, gnutlsError("TLS-PSK client credentials", r)
	}
	tc, err := newConn(c, false, nil, cred)
	if err != nil {
		C.gnutls_psk_free_client_credentials(cred)
		return nil, err
	}
	if err := tc.handshake(); err != nil {
		tc.free()
		return nil, fmt.Errorf("TLS-PSK handshake: %w", err)
	}
	tc.user = user
	return tc, nil
}

func newConn(c net.Conn, server bool, k *Keys, ccred C.gnutls_psk_client_credentials_t) (*Conn, error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil, fmt.Errorf("TLS-PSK needs a socket, not a %T", c)
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil, err
	}
	tc := &Conn{conn: c, raw: raw, ccred: ccred}
	tc.idle = sync.NewCond(&tc.mu)
	tc.lookup.keys = k
	tc.h = cgo.NewHandle(tc)
	var r C.int
	srv := C.int(0)
	if server {
		srv = 1
	}
	if err := raw.Control(func(fd uintptr) {
		r = C.psk_session(&tc.s, srv, C.int(fd), C.uintptr_t(tc.h), ccred)
	}); err != nil {
		tc.h.Delete()
		return nil, err
	}
	if r < 0 {
		tc.h.Delete()
		return nil, gnutlsError("TLS-PSK session", r)
	}
	return tc, nil
}

// lookupKey is the server's key callback (goPSKLookup): it hands
// GnuTLS the key of user, or fails for an unknown one.
func lookupKey(h uintptr, user string, key *C.gnutls_datum_t) C.int {
	tc := cgo.Handle(h).Value().(*Conn)
	tc.lookup.user = user
	k, ok := tc.lookup.keys.keys[user]
	if !ok {
		tc.lookup.unknown = true
		return -1
	}
	return C.psk_set_key(key, unsafe.Pointer(&k[0]), C.uint(len(k)))
}

// do runs op, which calls GnuTLS on the socket, until it stops asking to
// be repeated, waiting with Go's poller for the socket to be readable or
// writable, as GnuTLS says it was blocked on; the deadlines apply there.
// write says which GnuTLS is likelier to wait for.
func (c *Conn) do(write bool, op func() C.int) (C.int, error) {
	var r C.int
	for {
		turn := false
		f := func(fd uintptr) bool {
			for tries := 0; ; tries++ {
				c.gmu.Lock()
				for {
					r = op()
					if r != C.GNUTLS_E_INTERRUPTED {
						break
					}
				}
				wantWrite := r == C.GNUTLS_E_AGAIN && C.gnutls_record_get_direction(c.s) == 1
				c.gmu.Unlock()
				if r != C.GNUTLS_E_AGAIN {
					return true
				}
				if wantWrite != write {
					turn = true
					return true
				}
				// Go's poller is edge-triggered: it wakes on what
				// happens after this call. GnuTLS may have met the
				// socket's end after a partial record and still said
				// GNUTLS_E_AGAIN: nothing more will happen then, so
				// ask again while the socket is ready.
				w := C.int(0)
				if write {
					w = 1
				}
				if tries == 3 || C.psk_ready(C.int(fd), w) == 0 {
					return false // wait on the socket, then call f again
				}
			}
		}
		var err error
		if write {
			err = c.raw.Write(f)
		} else {
			err = c.raw.Read(f)
		}
		if err != nil {
			return r, err
		}
		if !turn {
			return r, nil
		}
		write = !write
	}
}

// handshake's error is GnuTLS's or the socket's, for the caller to
// prefix.
func (c *Conn) handshake() error {
	for {
		r, err := c.do(false, func() C.int { return C.gnutls_handshake(c.s) })
		if err != nil {
			return err
		}
		if r >= 0 {
			return nil
		}
		if r == C.GNUTLS_E_PREMATURE_TERMINATION {
			// The peer closed the socket: io.EOF, as crypto/tls says it.
			return fmt.Errorf("%s: %w", C.GoString(C.gnutls_strerror(r)), io.EOF)
		}
		if C.gnutls_error_is_fatal(r) != 0 {
			// Tell the peer why, best effort (the socket is non-blocking).
			c.raw.Write(func(uintptr) bool {
				c.gmu.Lock()
				C.gnutls_alert_send_appropriate(c.s, r)
				c.gmu.Unlock()
				return true
			})
			return errors.New(C.GoString(C.gnutls_strerror(r)))
		}
	}
}

func (c *Conn) enter() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closing {
		return net.ErrClosed
	}
	c.active++
	return nil
}

func (c *Conn) leave() {
	c.mu.Lock()
	c.active--
	if c.active == 0 {
		c.idle.Broadcast()
	}
	c.mu.Unlock()
}

// Read reads application data. A close_notify, or the socket's end at a
// record boundary, is io.EOF (as crypto/tls reports the latter too).
func (c *Conn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if err := c.enter(); err != nil {
		return 0, err
	}
	defer c.leave()
	for {
		var n C.ssize_t
		r, err := c.do(false, func() C.int {
			n = C.gnutls_record_recv(c.s, unsafe.Pointer(&p[0]), C.size_t(len(p)))
			if n < 0 {
				return C.int(n)
			}
			return 0
		})
		switch {
		case err != nil:
			return 0, err
		case n > 0:
			return int(n), nil
		case n == 0, r == C.GNUTLS_E_PREMATURE_TERMINATION:
			return 0, io.EOF
		case r == C.GNUTLS_E_REHANDSHAKE || C.gnutls_error_is_fatal(r) != 0:
			return 0, gnutlsError("TLS-PSK read", r)
		}
		// A warning alert: read on.
	}
}

// Write writes application data, in records of at most 16 KiB.
func (c *Conn) Write(p []byte) (int, error) {
	if err := c.enter(); err != nil {
		return 0, err
	}
	defer c.leave()
	done := 0
	for done < len(p) {
		var n C.ssize_t
		_, err := c.do(true, func() C.int {
			n = C.gnutls_record_send(c.s, unsafe.Pointer(&p[done]), C.size_t(len(p)-done))
			if n < 0 {
				return C.int(n)
			}
			return 0
		})
		if err != nil {
			return done, err
		}
		if n < 0 {
			return done, gnutlsError("TLS-PSK write", C.int(n))
		}
		done += int(n)
	}
	return done, nil
}

// Close sends close_notify (best effort, for at most a second), closes
// the socket and frees the session once no Read or Write uses it.
func (c *Conn) Close() error {
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		return net.ErrClosed
	}
	c.closing = true
	c.active++
	c.mu.Unlock()
	c.conn.SetWriteDeadline(time.Now().Add(time.Second))
	c.do(true, func() C.int { return C.gnutls_bye(c.s, C.GNUTLS_SHUT_WR) })
	err := c.conn.Close() // wakes a Read waiting on the socket
	c.leave()
	c.free()
	return err
}

// free waits for Read and Write to leave the session, then frees it.
func (c *Conn) free() {
	c.mu.Lock()
	for c.active > 0 {
		c.idle.Wait()
	}
	c.closing = true
	if c.freed {
		c.mu.Unlock()
		return
	}
	c.freed = true
	c.mu.Unlock()
	C.gnutls_deinit(c.s)
	if c.ccred != nil {
		C.gnutls_psk_free_client_credentials(c.ccred)
	}
	c.h.Delete()
}

// Description is GnuTLS's name of what was negotiated, such as
// "(TLS1.3-PSK)-(ECDHE-SECP256R1)-(AES-256-GCM)".
func (c *Conn) Description() string {
	if err := c.enter(); err != nil {
		return ""
	}
	defer c.leave()
	c.gmu.Lock()
	d := C.gnutls_session_get_desc(c.s)
	c.gmu.Unlock()
	defer C.psk_free(unsafe.Pointer(d))
	return C.GoString(d)
}

// Username is the PSK identity the handshake authenticated.
func (c *Conn) Username() string { return c.user }

func (c *Conn) LocalAddr() net.Addr                { return c.conn.LocalAddr() }
func (c *Conn) RemoteAddr() net.Addr               { return c.conn.RemoteAddr() }
func (c *Conn) SetDeadline(t time.Time) error      { return c.conn.SetDeadline(t) }
func (c *Conn) SetReadDeadline(t time.Time) error  { return c.conn.SetReadDeadline(t) }
func (c *Conn) SetWriteDeadline(t time.Time) error { return c.conn.SetWriteDeadline(t) }
