package nbdproto

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"
)

// File names of an x509 credentials directory, as QEMU's tls-creds-x509
// and libnbd's tls-certificates lay them out.
const (
	CACertFile     = "ca-cert.pem"
	ServerCertFile = "server-cert.pem"
	ServerKeyFile  = "server-key.pem"
	ClientCertFile = "client-cert.pem"
	ClientKeyFile  = "client-key.pem"
)

// LoadServerTLS builds the server TLS configuration from dir: the
// server's certificate and key, and the CA that client certificates are
// verified against. Like qemu-nbd's tls-creds-x509 (verify-peer=on by
// default), a client must present a certificate signed by that CA: TLS
// then authenticates clients, not only the server. verifyPeer false
// accepts clients without a certificate (a presented one is still
// verified), as verify-peer=off does.
//
// The credentials are checked now, as qemu-nbd checks them at start,
// rather than failing every client later: each file must be readable
// and hold what it should, the key must match the certificate, the
// server certificate and the CA must be within their validity dates and
// the server certificate must be signed by the CA.
//
// The certificate request names no acceptable CAs (no
// certificate_authorities), and client certificates are verified against
// the CA here rather than by crypto/tls's ClientCAs. The reason is
// GnuTLS: in TLS 1.3, Go's CertificateRequest offers only the signature
// schemes TLS 1.3 allows for handshake signatures (rsa_pss_rsae_*,
// ecdsa_*, ed25519), and crypto/tls has no setting to add others (the
// list is fixed in supportedSignatureAlgorithms; no GODEBUG changes it).
// GnuTLS 3.7's client, when the request names CAs, keeps only
// certificates whose key algorithm appears in that list, and it counts
// rsa_pss_rsae as RSA-PSS, not RSA: the RSA client certificates QEMU's
// documentation makes with certtool then match nothing and GnuTLS sends
// an empty Certificate (libnbd: "A TLS fatal alert has been received";
// qemu-img: "Cannot read from TLS channel"). Without a CA list a GnuTLS
// client that holds one certificate sends it, and signs with
// rsa_pss_rsae, which Go accepts. The verification that follows is the
// one ClientCAs would do: chain to the CA, client-auth key usage, dates.
func LoadServerTLS(dir string, verifyPeer bool) (*tls.Config, error) {
	cert, err := loadKeyPair(dir, ServerCertFile, ServerKeyFile)
	if err != nil {
		return nil, err
	}
	pool, err := loadCA(dir)
	if err != nil {
		return nil, err
	}
	if err := checkSignedBy(cert, pool, x509.ExtKeyUsageServerAuth); err != nil {
		return nil, fmt.Errorf("TLS credentials: %s: %w", filepath.Join(dir, ServerCertFile), err)
	}
	auth := tls.RequireAnyClientCert
	if !verifyPeer {
		auth = tls.RequestClientCert
	}
	return &tls.Config{
		Certificates: []tls.Certificate{cert},
		ClientAuth:   auth,
		MinVersion:   tls.VersionTLS12,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				if verifyPeer {
					return errors.New("tls: client didn't provide a certificate")
				}
				return nil
			}
			return verifyClient(cs.PeerCertificates, pool)
		},
	}, nil
}

// verifyClient verifies a client's certificate chain against the CA, as
// crypto/tls does with ClientCAs and RequireAndVerifyClientCert.
func verifyClient(chain []*x509.Certificate, pool *x509.CertPool) error {
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	_, err := chain[0].Verify(x509.VerifyOptions{
		Roots:         pool,
		Intermediates: inter,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	if err != nil {
		return fmt.Errorf("tls: client certificate %q: %w", chain[0].Subject, err)
	}
	return nil
}

// checkSignedBy checks that cert's chain leads to a CA of pool for usage,
// now.
func checkSignedBy(cert tls.Certificate, pool *x509.CertPool, usage x509.ExtKeyUsage) error {
	inter := x509.NewCertPool()
	for _, der := range cert.Certificate[1:] {
		if c, err := x509.ParseCertificate(der); err == nil {
			inter.AddCert(c)
		}
	}
	_, err := cert.Leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{usage}})
	var ua x509.UnknownAuthorityError
	switch {
	case errors.As(err, &ua):
		return fmt.Errorf("not signed by the CA in %s", CACertFile)
	case err != nil:
		return err
	}
	return nil
}

// loadKeyPair reads and checks a certificate and its key: readable
// files, PEM content, a key that matches the certificate, and dates.
func loadKeyPair(dir, certName, keyName string) (tls.Certificate, error) {
	certPath, keyPath := filepath.Join(dir, certName), filepath.Join(dir, keyName)
	certPEM, err := os.ReadFile(certPath)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("TLS credentials: %w", err)
	}
	keyPEM, err := os.ReadFile(keyPath)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("TLS credentials: %w", err)
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("TLS credentials: %s, %s: %w", certPath, keyPath, err)
	}
	if err := checkDates(cert.Leaf, time.Now()); err != nil {
		return tls.Certificate{}, fmt.Errorf("TLS credentials: %s: %w", certPath, err)
	}
	return cert, nil
}

// checkDates refuses a certificate outside its validity period, with
// qemu's wording.
func checkDates(c *x509.Certificate, now time.Time) error {
	if now.After(c.NotAfter) {
		return fmt.Errorf("the certificate has expired (not after %s)", c.NotAfter.UTC().Format(time.RFC3339))
	}
	if now.Before(c.NotBefore) {
		return fmt.Errorf("the certificate is not yet active (not before %s)", c.NotBefore.UTC().Format(time.RFC3339))
	}
	return nil
}

// LoadClientTLS builds a client TLS configuration from dir: the CA and,
// if present, the client certificate and key.
func LoadClientTLS(dir string) (*tls.Config, error) {
	pool, err := loadCA(dir)
	if err != nil {
		return nil, err
	}
	cfg := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	cert, err := loadKeyPair(dir, ClientCertFile, ClientKeyFile)
	switch {
	case err == nil:
		cfg.Certificates = []tls.Certificate{cert}
	case !errors.Is(err, fs.ErrNotExist):
		return nil, err
	}
	return cfg, nil
}

// loadCA reads the CA certificates of dir; each must be within its dates.
func loadCA(dir string) (*x509.CertPool, error) {
	path := filepath.Join(dir, CACertFile)
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("TLS credentials: %w", err)
	}
	pool := x509.NewCertPool()
	n := 0
	for rest := data; ; {
		var c *x509.Certificate
		c, rest, err = nextCert(rest)
		if err != nil {
			return nil, fmt.Errorf("TLS credentials: %s: %w", path, err)
		}
		if c == nil {
			break
		}
		if err := checkDates(c, time.Now()); err != nil {
			return nil, fmt.Errorf("TLS credentials: %s: CA %q: %w", path, c.Subject, err)
		}
		pool.AddCert(c)
		n++
	}
	if n == 0 {
		return nil, fmt.Errorf("TLS credentials: %s: no certificate", path)
	}
	return pool, nil
}

// nextCert parses the next CERTIFICATE block of PEM data (text between
// blocks, as certtool writes it, is skipped). It returns nil at the end.
func nextCert(data []byte) (*x509.Certificate, []byte, error) {
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			return nil, nil, nil
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		return c, data, err
	}
}
