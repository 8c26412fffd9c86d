package main

import (
	"context"
	"io"
	"net"
	"strings"

	"github.com/nbdgw/nbdgw/metactx"
	"github.com/nbdgw/nbdgw/nbdserver"
	"github.com/nbdgw/nbdgw/qemumap"
)

// mapURI prints the map of the NBD server at uri: with a context, what
// nbdinfo --map=CONTEXT prints (text, or JSON with output "json");
// without one, what qemu-img map prints for the URI (QEMU's NBD client,
// 7.2 as 10.0, asks base:allocation only).
func mapURI(w io.Writer, uri, ctxName, output string) error {
	ctx := context.Background()
	name := ctxName
	if name == "" {
		name = metactx.BaseAllocation
	}
	c, err := nbdserver.Dial(ctx, uri, nbdserver.ClientOptions{
		StructuredReplies: true,
		ExtendedHeaders:   true,
		MetaContexts:      []string{name},
	})
	if err != nil {
		return err
	}
	defer c.Close()
	if ctxName == "" {
		u, err := nbdserver.ParseURI(uri)
		if err != nil {
			return err
		}
		return qemuMap(ctx, w, c, qemuFilename(u), output == "json")
	}
	return contextMap(ctx, w, c, ctxName, output == "json")
}

// contextMap prints nbdinfo's --map lines, coalescing adjacent extents of
// equal flags as nbdinfo does.
func contextMap(ctx context.Context, w io.Writer, c *nbdserver.Client, name string, asJSON bool) error {
	var buf []byte
	first := true
	emit := func(off, n int64, flags uint32) error {
		if asJSON {
			if !first {
				buf = append(buf, metactx.JSONSep...)
			}
			buf = metactx.AppendJSON(buf, name, off, n, flags)
		} else {
			buf = metactx.AppendText(buf, name, off, n, flags)
		}
		first = false
		if len(buf) < 64<<10 {
			return nil
		}
		_, err := w.Write(buf)
		buf = buf[:0]
		return err
	}
	if asJSON {
		buf = append(buf, metactx.JSONOpen...)
	}
	var cur struct {
		off, n int64
		flags  uint32
	}
	err := c.BlockStatus(ctx, name, 0, c.Size(), func(off, n int64, flags uint32) error {
		if cur.n > 0 && cur.flags == flags && cur.off+cur.n == off {
			cur.n += n
			return nil
		}
		if cur.n > 0 {
			if err := emit(cur.off, cur.n, cur.flags); err != nil {
				return err
			}
		}
		cur.off, cur.n, cur.flags = off, n, flags
		return nil
	})
	if err != nil {
		return err
	}
	if cur.n > 0 {
		if err := emit(cur.off, cur.n, cur.flags); err != nil {
			return err
		}
	}
	if asJSON {
		buf = append(buf, metactx.JSONClose...)
	}
	_, err = w.Write(buf)
	return err
}

// qemuMap prints what qemu-img map prints for an NBD export. QEMU 7.2's
// NBD client maps base:allocation to DATA = !HOLE and ZERO = ZERO, always
// with a valid offset equal to the guest offset; the block layer calls a
// range allocated ("present") when it is DATA or ZERO; depth is 0 (the
// NBD node has no backing file).
func qemuMap(ctx context.Context, w io.Writer, c *nbdserver.Client, filename string, asJSON bool) error {
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
func qemuFilename(u *nbdserver.URI) string {
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
