package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strconv"
	"syscall"

	"github.com/nbdgw/nbdgw/nbdserver"
	"github.com/nbdgw/nbdgw/qcow2"
)

func cmdServe(args []string) error {
	fs := newFlags("serve")
	socket := fs.String("socket", "", "listen on this unix socket")
	listen := fs.String("listen", "", "listen on HOST:PORT (default 127.0.0.1:10809)")
	exportName := fs.String("export-name", "", "export name (the default export answers \"\" too), at most 4096 bytes")
	description := fs.String("description", "", "export description sent to clients (NBD_INFO_DESCRIPTION), at most 4096 bytes")
	imgFlags := addImageFlags(fs)
	writable := fs.Bool("writable", false, "allow writes to the image (the top layer of its chain)")
	snapshot := fs.Bool("snapshot", false, "allow writes, to a temporary overlay deleted at exit (the chain is not changed)")
	tlsCreds := fs.String("tls-creds", "", "directory with ca-cert.pem, server-cert.pem, server-key.pem")
	tlsRequired := fs.Bool("tls-required", false, "refuse clients that do not start TLS")
	tlsVerifyPeer := fs.Bool("tls-verify-peer", true, "require client certificates signed by the CA (as qemu-nbd's verify-peer=on)")
	handshakeTimeout := fs.Duration("handshake-timeout", nbdserver.DefaultHandshakeTimeout, "drop clients that have not finished option negotiation (TLS included) in this time")
	maxConns := fs.Int("max-connections", nbdserver.DefaultMaxConnections, "connections served at once; more wait in the listen backlog")
	maxPerAddr := fs.Int("max-per-address", nbdserver.DefaultMaxPerAddress, "connections from one client IP address in the handshake at once; more are closed (-1: no limit)")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 || (*socket != "" && *listen != "") {
		return errUsage
	}
	if *writable && *snapshot {
		return errors.New("--writable and --snapshot exclude each other")
	}
	if *tlsRequired && *tlsCreds == "" {
		return errors.New("--tls-required needs --tls-creds")
	}
	if *handshakeTimeout <= 0 || *maxConns <= 0 || *maxPerAddr == 0 || *maxPerAddr < -1 {
		return errors.New("--handshake-timeout and --max-connections must be positive, --max-per-address positive or -1")
	}
	cfg := nbdserver.Config{
		HandshakeTimeout: *handshakeTimeout,
		MaxConnections:   *maxConns,
		MaxPerAddress:    *maxPerAddr,
		TLSRequired:      *tlsRequired,
		Logf:             func(f string, a ...any) { fmt.Fprintf(os.Stderr, "nbdgw serve: "+f+"\n", a...) },
	}
	cfg.Exports = []*nbdserver.Export{{Name: *exportName, Description: *description}}
	if err := cfg.Validate(); err != nil {
		return err
	}
	if *tlsCreds != "" {
		if cfg.TLS, err = nbdserver.LoadServerTLS(*tlsCreds, *tlsVerifyPeer); err != nil {
			return err
		}
	}
	opts := imgFlags.options()
	opts.Writable, opts.Snapshot = *writable, *snapshot
	img, err := qcow2.Open(pos[0], opts)
	if err != nil {
		return err
	}
	closed := false
	defer func() {
		if !closed {
			img.Close()
		}
	}()
	cfg.Exports[0].Image, cfg.Exports[0].Writable = img, *writable || *snapshot

	l, cleanup, err := serveListener(*socket, *listen)
	if err != nil {
		return err
	}
	defer cleanup()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	srv := nbdserver.NewServer(cfg)
	err = srv.Serve(ctx, l)
	// Close stops reading requests and answers those in flight; only then
	// is the image closed, which flushes a writable one.
	srv.Close()
	closed = true
	if cerr := img.Close(); cerr != nil {
		return fmt.Errorf("closing %s: %w", pos[0], cerr)
	}
	if ctx.Err() != nil {
		return nil // SIGINT/SIGTERM: a clean stop
	}
	return err
}

// serveListener returns the systemd-activated socket if there is one,
// else a unix or TCP listener. cleanup removes a unix socket we created.
func serveListener(socket, listen string) (net.Listener, func(), error) {
	nop := func() {}
	if l, err := activationListener(); l != nil || err != nil {
		if err == nil && (socket != "" || listen != "") {
			l.Close()
			return nil, nop, errors.New("--socket/--listen conflict with systemd socket activation")
		}
		return l, nop, err
	}
	if socket != "" {
		if fi, err := os.Lstat(socket); err == nil && fi.Mode()&os.ModeSocket != 0 {
			os.Remove(socket) // a stale socket from an earlier run
		}
		l, err := net.Listen("unix", socket)
		if err != nil {
			return nil, nop, err
		}
		return l, func() { os.Remove(socket) }, nil
	}
	if listen == "" {
		listen = net.JoinHostPort("127.0.0.1", nbdserver.DefaultPort)
	}
	l, err := net.Listen("tcp", listen)
	return l, nop, err
}

// activationListener implements systemd socket activation: LISTEN_PID
// names this process and LISTEN_FDS counts descriptors from fd 3. The
// variables are removed so that child processes do not inherit them.
func activationListener() (net.Listener, error) {
	pid, fds := os.Getenv("LISTEN_PID"), os.Getenv("LISTEN_FDS")
	if pid == "" || fds == "" || pid != strconv.Itoa(os.Getpid()) {
		return nil, nil
	}
	os.Unsetenv("LISTEN_PID")
	os.Unsetenv("LISTEN_FDS")
	os.Unsetenv("LISTEN_FDNAMES")
	n, err := strconv.Atoi(fds)
	if err != nil || n < 1 {
		return nil, fmt.Errorf("socket activation: LISTEN_FDS=%q", fds)
	}
	if n > 1 {
		return nil, fmt.Errorf("socket activation: %d sockets passed, want 1", n)
	}
	syscall.CloseOnExec(3)
	f := os.NewFile(3, "systemd-socket")
	defer f.Close()
	l, err := net.FileListener(f)
	if err != nil {
		return nil, fmt.Errorf("socket activation: %w", err)
	}
	return l, nil
}
