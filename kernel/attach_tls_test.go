package kernel

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nbdgw/nbdgw/internal/gnutlspsk"
	"github.com/nbdgw/nbdgw/nbdserver"
	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
	"github.com/nbdgw/nbdgw/nbdserver/testcerts"
)

// countingListener records the connections it accepts.
type countingListener struct {
	net.Listener
	mu    sync.Mutex
	conns []net.Conn
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.mu.Lock()
		l.conns = append(l.conns, c)
		l.mu.Unlock()
	}
	return c, err
}

func (l *countingListener) accepted() []net.Conn {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]net.Conn(nil), l.conns...)
}

// tlsServer serves path with TLS required (X.509 from certs, or TLS-PSK
// from keys) on a unix socket and returns the socket and the listener.
func tlsServer(t *testing.T, path string, tcfg *tls.Config, keys *gnutlspsk.Keys) (string, *countingListener) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "nbds.sock")
	ul, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	l := &countingListener{Listener: ul}
	srv := nbdserver.NewServer(nbdserver.Config{
		Exports: []*nbdserver.Export{{Name: "", Image: openImage(t, path)}},
		TLS:     tcfg, PSK: keys, TLSRequired: true, Logf: t.Logf,
	})
	done := make(chan error, 1)
	go func() { done <- srv.Serve(context.Background(), l) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-done; err != nil && !errors.Is(err, nbdserver.ErrServerClosed) {
			t.Errorf("Serve: %v", err)
		}
	})
	return sock, l
}

// readAll reads the whole device through the kernel's end as the kernel does.
func readAll(t *testing.T, c net.Conn, size int) []byte {
	t.Helper()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	defer c.SetDeadline(time.Time{})
	got := make([]byte, size)
	for off := 0; off < size; off += 1 << 20 {
		if err := kernelRead(c, uint64(off), got[off:off+1<<20], uint64(off)); err != nil {
			t.Fatal(err)
		}
	}
	return got
}

// TestAttachTLS attaches nbds+unix:// exports of a --tls-required server
// (X.509 from --tls-creds or the URI's tls-certificates, TLS-PSK with
// the URI's username or QEMU's default): the kernel gets a plain socket
// with simple replies and reads the image; a connection the server drops
// is redialled with a fresh TLS handshake and handed over with
// RECONFIGURE.
func TestAttachTLS(t *testing.T) {
	path, want := testImage(t)
	certs := t.TempDir()
	if err := testcerts.Write(certs, true); err != nil {
		t.Fatal(err)
	}
	key := make([]byte, 32)
	rand.Read(key)
	pskFile := filepath.Join(t.TempDir(), "keys.psk")
	if err := os.WriteFile(pskFile, []byte("alice:"+hex.EncodeToString(key)+"\nqemu:"+hex.EncodeToString(key[:16])+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name, user, query string
		creds, psk        string
	}{
		{name: "x509", creds: certs},
		{name: "x509-uri", query: "tls-certificates=" + certs + "&"},
		{name: "psk-user", user: "alice@", psk: pskFile},
		{name: "psk-default", psk: pskFile},
	} {
		t.Run(c.name, func(t *testing.T) {
			var (
				tcfg      *tls.Config
				keys      *gnutlspsk.Keys
				verified  atomic.Int32 // server-side X.509 handshakes
				handshake = func() int { return int(verified.Load()) }
			)
			if c.psk != "" {
				var err error
				if keys, err = gnutlspsk.Load(c.psk); err != nil {
					t.Fatal(err)
				}
			} else {
				var err error
				if tcfg, err = nbdproto.LoadServerTLS(certs, true); err != nil {
					t.Fatal(err)
				}
				tcfg.VerifyConnection = func(cs tls.ConnectionState) error {
					if len(cs.PeerCertificates) == 0 {
						return errors.New("no client certificate")
					}
					verified.Add(1)
					return nil
				}
			}
			sock, l := tlsServer(t, path, tcfg, keys)
			uri := "nbds+unix://" + c.user + "/?" + c.query + "socket=" + sock
			k := &fakeKernel{t: t, index: 3}
			kc := fakeKernelConn(t, k)
			a, err := Attach(context.Background(), kc, AttachConfig{
				URI: uri, Name: uri, Index: AnyIndex, TLSCreds: c.creds, TLSPSK: c.psk,
			})
			if err != nil {
				t.Fatal(err)
			}
			k.mu.Lock()
			conns, size := k.conns, k.size
			k.mu.Unlock()
			if size != uint64(len(want)) || len(conns) != 1 {
				t.Fatalf("size %d with %d sockets, want %d with 1", size, len(conns), len(want))
			}
			if _, ok := conns[0].(*net.UnixConn); !ok {
				t.Fatalf("the kernel got a %T, not a socket", conns[0])
			}
			if !bytes.Equal(readAll(t, conns[0], len(want)), want) {
				t.Error("content read through the kernel's socket differs from qemu-img convert's")
			}
			if n := len(l.accepted()); n != 1 {
				t.Errorf("%d connections accepted, want 1", n)
			}
			if tcfg != nil && handshake() != 1 {
				t.Errorf("%d X.509 handshakes with a client certificate, want 1", handshake())
			}

			// The server drops the connection: the kernel's socket ends
			// (LINK_DEAD) and reconnect replaces it.
			l.accepted()[0].Close()
			conns[0].SetReadDeadline(time.Now().Add(10 * time.Second))
			if n, err := conns[0].Read(make([]byte, 1)); n != 0 || !errors.Is(err, io.EOF) {
				t.Fatalf("kernel socket after the server dropped the connection: %d, %v; want EOF", n, err)
			}
			if err := a.reconnect(context.Background()); err != nil {
				t.Fatal(err)
			}
			k.mu.Lock()
			conns, recon := k.conns, k.reconfigures
			k.mu.Unlock()
			if recon != 1 || len(conns) != 1 {
				t.Fatalf("%d RECONFIGUREs with %d sockets, want 1 with 1", recon, len(conns))
			}
			if !bytes.Equal(readAll(t, conns[0], len(want)), want) {
				t.Error("content after the reconnection differs")
			}
			if n := len(l.accepted()); n != 2 {
				t.Errorf("%d connections accepted, want 2", n)
			}
			if tcfg != nil && handshake() != 2 {
				t.Errorf("%d X.509 handshakes after the reconnection, want 2", handshake())
			}
			stopAndWait(t, a, kc, "detach", 3, 10*time.Second)
		})
	}
}

// TestAttachTLSErrors: credentials that cannot work are refused before
// anything reaches the kernel, with one-line errors.
func TestAttachTLSErrors(t *testing.T) {
	certs := t.TempDir()
	if err := testcerts.Write(certs, false); err != nil {
		t.Fatal(err)
	}
	pskFile := filepath.Join(t.TempDir(), "keys.psk")
	if err := os.WriteFile(pskFile, []byte("bob:00112233\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		uri, creds, psk, want string
	}{
		{uri: "nbd://127.0.0.1:1/", creds: certs, want: "plain URI"},
		{uri: "nbds://127.0.0.1:1/", creds: certs, psk: pskFile, want: "exclude each other"},
		{uri: "nbds://127.0.0.1:1/", creds: t.TempDir(), want: "ca-cert.pem"},
		{uri: "nbds://127.0.0.1:1/", psk: pskFile, want: `no key for username "qemu"`},
	} {
		k := &fakeKernel{t: t, index: 0}
		_, err := Attach(context.Background(), fakeKernelConn(t, k), AttachConfig{URI: c.uri, Name: c.uri, Index: AnyIndex, TLSCreds: c.creds, TLSPSK: c.psk})
		if err == nil || !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%s creds=%q psk=%q: %v, want one line with %q", c.uri, c.creds, c.psk, err, c.want)
		}
		if k.connectCalls != 0 {
			t.Errorf("%s: CONNECT sent", c.uri)
		}
	}
}
