package nbdproto

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
)

// DefaultPort is the IANA NBD port.
const DefaultPort = "10809"

// URI is a parsed NBD URI (see nbd-uri.md).
type URI struct {
	Network, Address string // for net.Dial: "tcp" host:port or "unix" path
	Export           string
	TLS              bool   // nbds or nbds+unix
	TLSHostname      string // tls-hostname, else the URI host
	TLSVerifyPeer    bool   // tls-verify-peer (default true)
	TLSCertificates  string // tls-certificates=DIR (libnbd's extension)
	User             string // the user part (nbds://USER@host/: the TLS-PSK username)
}

// uriSchemes are the schemes ParseURI accepts.
var uriSchemes = []string{"nbd", "nbds", "nbd+unix", "nbds+unix"}

// IsURI tells an NBD URI from an image path: s starts with one of the
// schemes ParseURI accepts (compared as url.Parse does, ignoring case)
// followed by "://". Every command taking IMAGE|NBD-URI decides with it,
// so that "dir:/x://y" is a path everywhere and "nbd://host" a server.
func IsURI(s string) bool {
	scheme, rest, ok := strings.Cut(s, ":")
	if !ok || !strings.HasPrefix(rest, "//") {
		return false
	}
	for _, k := range uriSchemes {
		if strings.EqualFold(scheme, k) {
			return true
		}
	}
	return false
}

// ErrBadURI wraps every URI parsing failure.
var ErrBadURI = errors.New("nbd: bad NBD URI")

// ParseURI parses nbd://, nbds://, nbd+unix:// and nbds+unix:// URIs.
func ParseURI(s string) (*URI, error) {
	u, err := url.Parse(s)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadURI, err)
	}
	r := &URI{TLSVerifyPeer: true}
	switch u.Scheme {
	case "nbd", "nbds":
		r.Network = "tcp"
	case "nbd+unix", "nbds+unix":
		r.Network = "unix"
	default:
		return nil, fmt.Errorf("%w: scheme %q", ErrBadURI, u.Scheme)
	}
	r.TLS = strings.HasPrefix(u.Scheme, "nbds")
	if u.User != nil {
		r.User = u.User.Username()
	}
	r.Export = strings.TrimPrefix(u.Path, "/")
	if err := r.parseQuery(u.Query()); err != nil {
		return nil, err
	}
	if r.Network == "unix" {
		if r.Address == "" {
			return nil, fmt.Errorf("%w: %s needs a socket= parameter", ErrBadURI, u.Scheme)
		}
		return r, nil
	}
	if r.Address != "" {
		return nil, fmt.Errorf("%w: socket= is only for nbd+unix", ErrBadURI)
	}
	host, port := u.Hostname(), u.Port()
	if host == "" {
		host = "localhost"
	}
	if port == "" {
		port = DefaultPort
	}
	r.Address = net.JoinHostPort(host, port)
	if r.TLSHostname == "" {
		r.TLSHostname = host
	}
	return r, nil
}

func (r *URI) parseQuery(q url.Values) error {
	for k, vs := range q {
		v := vs[len(vs)-1]
		switch k {
		case "socket":
			r.Address = v
		case "tls-hostname":
			r.TLSHostname = v
		case "tls-certificates":
			r.TLSCertificates = v
		case "tls-verify-peer":
			switch v {
			case "0", "false":
				r.TLSVerifyPeer = false
			case "1", "true":
				r.TLSVerifyPeer = true
			default:
				return fmt.Errorf("%w: tls-verify-peer=%q", ErrBadURI, v)
			}
		case "tls-type":
			if v != "x509" {
				return fmt.Errorf("%w: tls-type=%s is not supported (x509 only)", ErrBadURI, v)
			}
		default:
			if !strings.HasPrefix(k, "x-") {
				return fmt.Errorf("%w: unknown query parameter %q", ErrBadURI, k)
			}
		}
	}
	return nil
}

// TLSConfig is the client TLS configuration the URI asks for: the CA and
// optional client certificate from tls-certificates, the host name to
// verify, and tls-verify-peer.
func (r *URI) TLSConfig() (*tls.Config, error) {
	cfg := &tls.Config{ServerName: r.TLSHostname, InsecureSkipVerify: !r.TLSVerifyPeer}
	if cfg.ServerName == "" {
		cfg.ServerName = "localhost"
	}
	if r.TLSCertificates != "" {
		c, err := LoadClientTLS(r.TLSCertificates)
		if err != nil {
			return nil, err
		}
		cfg.RootCAs, cfg.Certificates = c.RootCAs, c.Certificates
	}
	return cfg, nil
}
