package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"text/tabwriter"

	"github.com/nbdgw/nbdgw/kernel"
	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
	"github.com/nbdgw/nbdgw/qcow2"
)

func cmdAttach(args []string) (err error) {
	var (
		detached bool   // Wait returned without error
		dev      string // /dev/nbdN once attached
	)
	fs := newFlags("attach")
	imgFlags := addImageFlags(fs)
	device := fs.String("device", "", "attach to `/dev/nbdN` (default: the kernel picks a free device)")
	conns := fs.Int("connections", 1, "`N` connections serving the device")
	writable := fs.Bool("writable", false, "leave the device writable")
	tlsCreds := fs.String("tls-creds", "", "for nbds:// and nbds+unix://: X.509 credentials from `DIR` (ca-cert.pem, optional client-cert.pem and client-key.pem); default: the URI's tls-certificates. TLS is terminated in-process and the kernel gets a plain socket")
	tlsPSK := fs.String("tls-psk", "", "for nbds:// and nbds+unix://: TLS with the pre-shared key from `FILE` of username:hexkey lines, for the URI's username (nbds://USER@host/, default qemu); needs a build with cgo (GnuTLS)")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if err := wantArgs(pos, "IMAGE|NBD-URI"); err != nil {
		return err
	}
	target := pos[0]
	index := kernel.AnyIndex
	if *device != "" {
		if index, err = kernel.ParseDevice(*device); err != nil {
			return fmt.Errorf("--device: %w", err)
		}
	}
	if *conns < 1 {
		return usagef("--connections %d: want at least 1", *conns)
	}
	if *tlsCreds != "" && *tlsPSK != "" {
		return usagef("--tls-creds and --tls-psk exclude each other")
	}
	if *tlsCreds != "" || *tlsPSK != "" {
		u, uerr := nbdproto.ParseURI(target)
		if !nbdproto.IsURI(target) || uerr != nil || !u.TLS {
			return usagef("--tls-creds and --tls-psk are for nbds:// and nbds+unix:// URIs")
		}
	}
	cfg := kernel.AttachConfig{
		Index:       index,
		Connections: *conns,
		Writable:    *writable,
		TLSCreds:    *tlsCreds,
		TLSPSK:      *tlsPSK,
		Logf:        func(f string, a ...any) { fmt.Fprintf(os.Stderr, "nbdgw attach: "+f+"\n", a...) },
	}
	// Caught until the image is closed: a second signal must not cut the
	// final flush short.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if nbdproto.IsURI(target) {
		cfg.URI, cfg.Name = target, target
	} else {
		// Without --writable no file of the chain is opened for writing.
		opts := imgFlags.options()
		opts.Writable = *writable
		img, oerr := qcow2.Open(target, opts)
		if oerr != nil {
			return oerr
		}
		defer func() {
			// Last: every connection has stopped and Wait has flushed;
			// Close flushes again (and stores bitmaps back). Only then
			// may a writable attach report success.
			cerr := img.Close()
			if cerr != nil && err == nil {
				err = fmt.Errorf("closing %s: %w", target, cerr)
			}
			if err == nil && *writable && detached {
				fmt.Fprintf(os.Stderr, "nbdgw attach: %s detached; %s flushed and closed\n", dev, target)
			}
		}()
		cfg.Image = img
		if abs, aerr := filepath.Abs(target); aerr == nil {
			cfg.Name = abs
		} else {
			cfg.Name = target
		}
	}

	c, err := kernel.Open(kernel.Options{})
	if err != nil {
		return err
	}
	defer c.Close()
	a, err := kernel.Attach(ctx, c, cfg)
	if err != nil {
		return err
	}
	dev = a.Path()
	fmt.Println(dev)
	if err := a.Wait(ctx); err != nil {
		return err
	}
	detached = true
	return nil
}

func cmdDetach(args []string) error {
	fs := newFlags("detach")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if err := wantArgs(pos, "/dev/nbdN"); err != nil {
		return err
	}
	index, err := kernel.ParseDevice(pos[0])
	if err != nil {
		return err
	}
	c, err := kernel.Open(kernel.Options{NoModuleLoad: true})
	if err != nil {
		return err
	}
	defer c.Close()
	return c.Disconnect(index)
}

func cmdList(args []string) error {
	fs := newFlags("list")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if err := wantArgs(pos); err != nil {
		return err
	}
	c, err := kernel.Open(kernel.Options{NoModuleLoad: true})
	if err != nil {
		if errors.Is(err, kernel.ErrNotSupported) {
			return fmt.Errorf("no nbd devices: %w", err)
		}
		return err
	}
	defer c.Close()
	devs, err := c.Status(-1)
	if err != nil {
		return err
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "DEVICE\tCONNECTED\tPID\tSIZE\tRO\tBACKEND")
	dash := func(s string, ok bool) string {
		if !ok {
			return "-"
		}
		return s
	}
	for _, d := range devs {
		in := kernel.DeviceInfo(int(d.Index))
		conn, ro := "no", "-"
		if d.Connected {
			conn = "yes"
			ro = strconv.FormatBool(in.ReadOnly)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", kernel.DevicePath(int(d.Index)), conn,
			dash(strconv.Itoa(in.PID), in.PID > 0),
			dash(strconv.FormatInt(in.Size, 10), d.Connected && in.Size > 0),
			ro, dash(in.Backend, in.Backend != ""))
	}
	return tw.Flush()
}
