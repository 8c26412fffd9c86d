package main

import (
	"context"
	"io"
	"net"
	"strings"

	"github.com/nbdgw/nbdgw/internal/metactx"
	"github.com/nbdgw/nbdgw/internal/qemumap"
	"github.com/nbdgw/nbdgw/nbdserver/nbdclient"
	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
)

// mapURI prints the map of the NBD server at uri: with a context, what
// nbdinfo --map=CONTEXT prints in form f;
// without one, what qemu-img map prints for the URI (QEMU's NBD client,
// 7.2 as 10.0, asks base:allocation only).
func mapURI(w io.Writer, uri, ctxName string, f metactx.Format) error {
	ctx := context.Background()
	name := ctxName
	if name == "" {
		name = metactx.BaseAllocation
	}
	c, err := nbdclient.Dial(ctx, uri, nbdclient.Options{
		StructuredReplies: true,
		ExtendedHeaders:   true,
		MetaContexts:      []string{name},
	})
	if err != nil {
		return err
	}
	defer c.Close()
	if ctxName == "" {
		u, err := nbdproto.ParseURI(uri)
		if err != nil {
			return err
		}
		return qemuMap(ctx, w, c, qemuFilename(u), f.JSON)
	}
	return contextMap(ctx, w, c, ctxName, f)
}

// contextMap prints what nbdinfo --map=NAME prints for the server c is
// connected to, through the one writer of nbdinfo maps, metactx.Map.
func contextMap(ctx context.Context, w io.Writer, c *nbdclient.Client, name string, f metactx.Format) error {
	src := func(off int64, fn func(off, length int64, flags uint32) error) error {
		return c.BlockStatus(ctx, name, off, c.Size()-off, fn)
	}
	_, err := metactx.NewMap(name, f, c.Size(), src).WriteTo(w)
	return err
}

// qemuMap prints what qemu-img map prints for an NBD export. QEMU 7.2's
// NBD client maps base:allocation to DATA = !HOLE and ZERO = ZERO, always
// with a valid offset equal to the guest offset; the block layer calls a
// range allocated ("present") when it is DATA or ZERO; depth is 0 (the
// NBD node has no backing file).
func qemuMap(ctx context.Context, w io.Writer, c *nbdclient.Client, filename string, asJSON bool) error {
	m, err := qemumap.NewWriter(w, asJSON)
	if err != nil {
		return err
	}
	err = c.BlockStatus(ctx, metactx.BaseAllocation, 0, c.Size(), func(off, n int64, flags uint32) error {
		data, zero := flags&metactx.StateHole == 0, flags&metactx.StateZero != 0
		return m.Add(qemumap.Entry{
			Start: off, Length: n,
			Data: data, Zero: zero,
			Present:   data || zero,
			HasOffset: true, Offset: off,
			Filename: filename,
		})
	})
	if err != nil {
		return err
	}
	return m.Close()
}

// qemuFilename is the file name QEMU 7.2's NBD driver gives its node
// (nbd_refresh_filename), printed by qemu-img map's human output. QEMU
// leaves it empty for IPv6 hosts.
func qemuFilename(u *nbdproto.URI) string {
	if u.Network == "unix" {
		if u.Export == "" {
			return "nbd+unix://?socket=" + u.Address
		}
		return "nbd+unix:///" + u.Export + "?socket=" + u.Address
	}
	host, port, err := net.SplitHostPort(u.Address)
	if err != nil || strings.Contains(host, ":") {
		return ""
	}
	if u.Export == "" {
		return "nbd://" + host + ":" + port
	}
	return "nbd://" + host + ":" + port + "/" + u.Export
}
