package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strconv"
	"syscall"

	"github.com/nbdgw/nbdgw/internal/gnutlspsk"
	"github.com/nbdgw/nbdgw/nbdserver"
	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
	"github.com/nbdgw/nbdgw/qcow2"
)

func cmdServe(args []string) error {
	fs := newFlags("serve")
	var socket, bind, port, exportName string
	fs.StringVar(&socket, "socket", "", "listen on this unix `PATH`")
	fs.StringVar(&socket, "k", "", "")
	listen := fs.String("listen", "", "listen on `HOST:PORT` (default 127.0.0.1:10809)")
	fs.StringVar(&bind, "bind", "", "listen on this `ADDRESS` (qemu-nbd's -b; default 127.0.0.1)")
	fs.StringVar(&bind, "b", "", "")
	fs.StringVar(&port, "port", "", "listen on this TCP `PORT` (qemu-nbd's -p; default 10809)")
	fs.StringVar(&port, "p", "", "")
	fs.StringVar(&exportName, "export-name", "", "export `NAME` (the default export answers \"\" too), at most 4096 bytes")
	fs.StringVar(&exportName, "x", "", "")
	description := fs.String("description", "", "export description `TEXT` sent to clients (NBD_INFO_DESCRIPTION), at most 4096 bytes")
	var exports exportsFlag
	fs.Var(&exports, "export", "serve an image as export `NAME=IMAGE[,writable][,no-backing][,description=TEXT]` (repeatable, instead of IMAGE; the first is the default export): NAME ends at the first '=', a single ',' ends IMAGE and each option, \",,\" is a literal comma (a file a,b is a,,b); read-only unless ,writable")
	exportDir := fs.String("export-dir", "", "serve every regular file of `DIR` as an export named by its file name, looked up when a client asks (new files appear without a restart), every file of its chain confined to DIR; opened at first use, closed when its last client is done; read-only unless --writable")
	imgFlags := addImageFlags(fs)
	writable := fs.Bool("writable", false, "allow writes to the image (the top layer of its chain), or to the --export-dir images")
	readOnly := fs.Bool("read-only", false, "serve read-only: the default, accepted for qemu-nbd's -r")
	fs.BoolVar(readOnly, "r", false, "")
	persistent := fs.Bool("persistent", false, "serve clients until SIGINT/SIGTERM: the default, accepted for qemu-nbd's -t")
	fs.BoolVar(persistent, "t", false, "")
	pidFile := fs.String("pid-file", "", "write the process id to `FILE` once listening (removed at exit)")
	verbose := fs.Bool("verbose", false, "log each client (address, options negotiated, errors) to stderr")
	fs.BoolVar(verbose, "v", false, "")
	snapshot := fs.Bool("snapshot", false, "allow writes, to a temporary overlay deleted at exit (the chain is not changed)")
	tlsCreds := fs.String("tls-creds", "", "`DIR` with ca-cert.pem, server-cert.pem, server-key.pem (and client certificates are checked against ca-cert.pem)")
	tlsPSK := fs.String("tls-psk", "", "TLS with pre-shared keys from `FILE` of username:hexkey lines (psktool's format, as nbdkit's --tls-psk and QEMU's tls-creds-psk keys.psk); needs a build with cgo (GnuTLS)")
	tlsRequired := fs.Bool("tls-required", false, "refuse clients that do not start TLS")
	tlsVerifyPeer := fs.Bool("tls-verify-peer", true, "require client certificates signed by the CA (as qemu-nbd's verify-peer=on; --tls-creds only)")
	handshakeTimeout := fs.Duration("handshake-timeout", nbdserver.DefaultHandshakeTimeout, "drop clients that have not finished option negotiation (TLS included) in this `DURATION`")
	maxConns := fs.Int("max-connections", nbdserver.DefaultMaxConnections, "`N` connections served at once; more wait in the listen backlog")
	maxPerAddr := fs.Int("max-per-address", nbdserver.DefaultMaxPerAddress, "`N` connections from one client IP address in the handshake at once; more are closed (-1: no limit)")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	multi := len(exports) > 0 || *exportDir != ""
	if multi {
		if err := wantArgs(pos); err != nil {
			return usagef("--export and --export-dir exclude IMAGE")
		}
		if exportName != "" || *description != "" || *snapshot {
			return usagef("--export-name, --description and --snapshot are for IMAGE; give --export NAME=IMAGE,description=TEXT")
		}
		if *writable && *exportDir == "" {
			return usagef("--writable with --export: write --export NAME=IMAGE,writable")
		}
	} else if err := wantArgs(pos, "IMAGE"); err != nil {
		return err
	}
	if socket != "" && (*listen != "" || bind != "" || port != "") {
		return usagef("--socket excludes --listen, --bind and --port")
	}
	if *listen != "" && (bind != "" || port != "") {
		return usagef("--listen HOST:PORT excludes --bind and --port")
	}
	if bind != "" || port != "" {
		*listen = net.JoinHostPort(cmp.Or(bind, "127.0.0.1"), cmp.Or(port, nbdproto.DefaultPort))
	}
	if *writable && *snapshot {
		return usagef("--writable and --snapshot exclude each other")
	}
	if *readOnly && (*writable || *snapshot) {
		return usagef("--read-only excludes --writable and --snapshot")
	}
	if *tlsCreds != "" && *tlsPSK != "" {
		return usagef("--tls-creds and --tls-psk exclude each other")
	}
	if *tlsRequired && *tlsCreds == "" && *tlsPSK == "" {
		return usagef("--tls-required needs --tls-creds or --tls-psk")
	}
	if *handshakeTimeout <= 0 || *maxConns <= 0 || *maxPerAddr == 0 || *maxPerAddr < -1 {
		return usagef("--handshake-timeout and --max-connections must be positive, --max-per-address positive or -1")
	}
	cfg := nbdserver.Config{
		HandshakeTimeout: *handshakeTimeout,
		MaxConnections:   *maxConns,
		MaxPerAddress:    *maxPerAddr,
		TLSRequired:      *tlsRequired,
		Log:              verboseLog(*verbose),
		Logf:             func(f string, a ...any) { fmt.Fprintf(os.Stderr, "nbdgw serve: "+f+"\n", a...) },
	}
	if multi {
		for _, e := range exports {
			cfg.Exports = append(cfg.Exports, &nbdserver.Export{Name: e.name, Description: e.description, Writable: e.writable})
		}
	} else {
		cfg.Exports = []*nbdserver.Export{{Name: exportName, Description: *description}}
	}
	if err := cfg.Validate(); err != nil {
		if multi {
			return usagef("%v", err) // names and descriptions of --export
		}
		return err
	}
	if *tlsCreds != "" {
		if cfg.TLS, err = nbdproto.LoadServerTLS(*tlsCreds, *tlsVerifyPeer); err != nil {
			return err
		}
	}
	if *tlsPSK != "" {
		if cfg.PSK, err = gnutlspsk.Load(*tlsPSK); err != nil {
			return err
		}
	}
	opts := imgFlags.options()
	var images []*qcow2.Image
	closed := false
	defer func() {
		if !closed {
			for _, img := range images {
				img.Close()
			}
		}
	}()
	var names []string // what each of images was opened from
	if multi {
		// One file under several names is opened once (writable if one
		// of them is), as two opens of it would fight over its locks.
		groups := exportGroups(exports)
		opened := map[int]*qcow2.Image{}
		for i, e := range exports {
			g := groups[i]
			img := opened[g]
			if img == nil {
				o := opts
				o.NoBacking = o.NoBacking || e.noBacking
				for j, f := range exports {
					o.Writable = o.Writable || groups[j] == g && f.writable
				}
				if img, err = qcow2.Open(e.image, o); err != nil {
					return fmt.Errorf("export %q: %w", e.name, err)
				}
				opened[g] = img
				images, names = append(images, img), append(names, e.image)
			}
			cfg.Exports[i].Image = img
		}
		if *exportDir != "" {
			d, err := newExportDir(*exportDir, opts, *writable, cfg.Logf)
			if err != nil {
				return err
			}
			cfg.Lookup, cfg.List = d.lookup, d.list
		}
	} else {
		opts.Writable, opts.Snapshot = *writable, *snapshot
		img, err := qcow2.Open(pos[0], opts)
		if err != nil {
			return err
		}
		images, names = append(images, img), append(names, pos[0])
		cfg.Exports[0].Image, cfg.Exports[0].Writable = img, *writable || *snapshot
	}

	l, cleanup, err := serveListener(socket, *listen)
	if err != nil {
		return err
	}
	defer cleanup()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	srv := nbdserver.NewServer(cfg)
	// Ready: the socket listens (connections wait in its backlog until
	// Serve accepts them), so scripts and systemd may connect now.
	if *pidFile != "" {
		if err := os.WriteFile(*pidFile, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
			return fmt.Errorf("--pid-file: %w", err)
		}
		defer os.Remove(*pidFile)
	}
	mode := "read-only"
	if *writable {
		mode = "writable"
	} else if *snapshot {
		mode = "writable, to a temporary overlay"
	}
	if multi {
		for _, e := range exports {
			m := "read-only"
			if e.writable {
				m = "writable"
			}
			fmt.Fprintf(os.Stderr, "nbdgw serve: serving %s as export %q (%s) on %s\n", e.image, e.name, m, listenerName(l))
		}
		if *exportDir != "" {
			fmt.Fprintf(os.Stderr, "nbdgw serve: serving the images of %s as exports named by file name (%s) on %s\n", *exportDir, mode, listenerName(l))
		}
	} else {
		fmt.Fprintf(os.Stderr, "nbdgw serve: serving %s as export %q (%s) on %s\n", pos[0], exportName, mode, listenerName(l))
	}
	if err := sdNotify("READY=1"); err != nil {
		fmt.Fprintf(os.Stderr, "nbdgw serve: warning: sd_notify: %v\n", err)
	}
	err = srv.Serve(ctx, l)
	// Close stops reading requests and answers those in flight; only then
	// is the image closed, which flushes a writable one.
	srv.Close()
	closed = true
	var closeErr error
	for i, img := range images {
		if cerr := img.Close(); cerr != nil && closeErr == nil {
			closeErr = fmt.Errorf("closing %s: %w", names[i], cerr)
		}
	}
	if closeErr != nil {
		return closeErr
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
		listen = net.JoinHostPort("127.0.0.1", nbdproto.DefaultPort)
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

// verboseLog is serve -v's logger of client events, or nil.
func verboseLog(on bool) *slog.Logger {
	if !on {
		return nil
	}
	return slog.New(slog.NewTextHandler(os.Stderr, nil))
}

// listenerName is how the ready line names where serve listens.
func listenerName(l net.Listener) string {
	if a := l.Addr(); a.Network() == "unix" {
		return "unix:" + a.String()
	}
	return l.Addr().String()
}

// sdNotify sends state to systemd's notification socket ($NOTIFY_SOCKET,
// a path or "@" for the abstract namespace) for Type=notify units, as
// sd_notify(3) does; without the variable it does nothing.
func sdNotify(state string) error {
	name := os.Getenv("NOTIFY_SOCKET")
	if name == "" {
		return nil
	}
	if name[0] == '@' {
		name = "\x00" + name[1:]
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		return err
	}
	defer c.Close()
	_, err = c.Write([]byte(state))
	return err
}
