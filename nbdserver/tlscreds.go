package nbdserver

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
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
func LoadServerTLS(dir string, verifyPeer bool) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, ServerCertFile), filepath.Join(dir, ServerKeyFile))
	if err != nil {
		return nil, fmt.Errorf("loading TLS credentials: %w", err)
	}
	pool, err := loadCA(dir)
	if err != nil {
		return nil, err
	}
	auth := tls.RequireAndVerifyClientCert
	if !verifyPeer {
		auth = tls.VerifyClientCertIfGiven
	}
	return &tls.Config{
		Certificates: []tls.Certificate{cert},
		ClientCAs:    pool,
		ClientAuth:   auth,
		MinVersion:   tls.VersionTLS12,
	}, nil
}

// LoadClientTLS builds a client TLS configuration from dir: the CA and,
// if present, the client certificate and key.
func LoadClientTLS(dir string) (*tls.Config, error) {
	pool, err := loadCA(dir)
	if err != nil {
		return nil, err
	}
	cfg := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, ClientCertFile), filepath.Join(dir, ClientKeyFile))
	switch {
	case err == nil:
		cfg.Certificates = []tls.Certificate{cert}
	case !errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("loading client certificate: %w", err)
	}
	return cfg, nil
}

func loadCA(dir string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(filepath.Join(dir, CACertFile))
	if err != nil {
		return nil, fmt.Errorf("loading TLS CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("loading TLS CA: no certificate in %s", filepath.Join(dir, CACertFile))
	}
	return pool, nil
}
