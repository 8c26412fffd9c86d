package kernel

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"

	"github.com/nbdgw/nbdgw/internal/gnutlspsk"
	"github.com/nbdgw/nbdgw/nbdserver/nbdclient"
	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
)

// The kernel's nbd driver cannot speak TLS. For nbds:// and nbds+unix://
// Attach does the NBD handshake over TLS itself, hands the kernel one end
// of a unix socketpair and relays bytes between the other end and the
// TLS connection, one goroutine each way, for as long as both live.

// clientOptions builds the handshake options of every connection to
// cfg.URI (the first and each redial on LINK_DEAD alike): no structured
// replies nor extended headers (the kernel understands simple replies
// only) and, for nbds, the TLS credentials of cfg.
func clientOptions(cfg AttachConfig) (nbdclient.Options, error) {
	var opts nbdclient.Options
	u, err := nbdproto.ParseURI(cfg.URI)
	if err != nil {
		return opts, err
	}
	if cfg.TLSCreds != "" && cfg.TLSPSK != "" {
		return opts, errors.New("--tls-creds and --tls-psk exclude each other")
	}
	if !u.TLS {
		if cfg.TLSCreds != "" || cfg.TLSPSK != "" {
			return opts, fmt.Errorf("%s: TLS credentials given for a plain URI; use nbds:// or nbds+unix://", cfg.URI)
		}
		return opts, nil
	}
	if cfg.TLSPSK != "" {
		keys, err := gnutlspsk.Load(cfg.TLSPSK)
		if err != nil {
			return opts, err
		}
		user := u.User
		if user == "" {
			user = gnutlspsk.DefaultUsername
		}
		key, ok := keys.Key(user)
		if !ok {
			return opts, fmt.Errorf("TLS-PSK key file %s: no key for username %q", cfg.TLSPSK, user)
		}
		opts.StartTLS = func(c net.Conn) (net.Conn, error) { return gnutlspsk.Client(c, user, key) }
		return opts, nil
	}
	if opts.TLS, err = u.TLSConfig(); err != nil {
		return opts, err
	}
	if cfg.TLSCreds != "" {
		c, err := nbdproto.LoadClientTLS(cfg.TLSCreds)
		if err != nil {
			return opts, err
		}
		opts.TLS.RootCAs, opts.TLS.Certificates = c.RootCAs, c.Certificates
	}
	return opts, nil
}

// relays tracks the relay goroutines of an attachment.
type relays struct {
	mu    sync.Mutex
	conns map[net.Conn]struct{} // the TLS and relay ends still open
	wg    sync.WaitGroup
}

// start hands back the kernel's end of a socketpair whose other end is
// relayed to and from tc, which the relay owns from then on.
func (r *relays) start(tc net.Conn) (net.Conn, error) {
	relayEnd, kernelEnd, err := socketpair()
	if err != nil {
		tc.Close()
		return nil, err
	}
	r.mu.Lock()
	if r.conns == nil {
		r.conns = map[net.Conn]struct{}{}
	}
	r.conns[tc], r.conns[relayEnd] = struct{}{}, struct{}{}
	r.mu.Unlock()
	var once sync.Once
	closeBoth := func() {
		once.Do(func() {
			tc.Close()
			relayEnd.Close()
			r.mu.Lock()
			delete(r.conns, tc)
			delete(r.conns, relayEnd)
			r.mu.Unlock()
		})
	}
	r.wg.Add(2)
	go func() { defer r.wg.Done(); defer closeBoth(); io.Copy(tc, relayEnd) }()
	go func() { defer r.wg.Done(); defer closeBoth(); io.Copy(relayEnd, tc) }()
	return kernelEnd, nil
}

// stop closes every relay and waits for its goroutines.
func (r *relays) stop() {
	r.mu.Lock()
	for c := range r.conns {
		c.Close()
	}
	r.mu.Unlock()
	r.wg.Wait()
}
