package main

import (
	"bufio"
	"fmt"
	"os"
	"strings"

	"github.com/nbdgw/nbdgw/internal/metactx"
	"github.com/nbdgw/nbdgw/internal/qemumap"
	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
	"github.com/nbdgw/nbdgw/qcow2"
)

func cmdMap(args []string) error {
	fs := newFlags("map")
	output := fs.String("output", "human", "`FORMAT`: json or human")
	context := fs.String("context", "", "print the metadata context `NAME` (base:allocation, qemu:allocation-depth, qemu:joint-allocation, qemu:dirty-bitmap:BITMAP) in nbdinfo --map form")
	totals := fs.Bool("totals", false, "with --context: print the bytes of each type, as nbdinfo --map --totals")
	imgFlags := addImageFlags(fs)
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if err := wantArgs(pos, "IMAGE|NBD-URI"); err != nil {
		return err
	}
	if *output != "json" && *output != "human" {
		return usagef("--output=%s: want json or human", *output)
	}
	if *totals && *context == "" {
		return usagef("--totals needs --context")
	}
	format := metactx.Format{JSON: *output == "json", Totals: *totals}
	w := bufio.NewWriterSize(os.Stdout, 64<<10)
	defer w.Flush()
	if nbdproto.IsURI(pos[0]) {
		if imgFlags.noBacking {
			return usagef("--no-backing applies to image files, not NBD URIs")
		}
		if err := mapURI(w, pos[0], *context, format); err != nil {
			return err
		}
		return w.Flush()
	}
	img, err := qcow2.Open(pos[0], imgFlags.options())
	if err != nil {
		return err
	}
	defer img.Close()
	if *context != "" {
		if !metactx.Offered(img, *context) {
			return fmt.Errorf("%w %q (offered: %s)", metactx.ErrUnknownContext, *context, quotedNames(metactx.Names(img)))
		}
		m := metactx.NewMap(*context, format, img.Size(), metactx.ImageSource(img, *context))
		if _, err := m.WriteTo(w); err != nil {
			return err
		}
		return w.Flush()
	}
	if err := qemumap.WriteImage(w, img, *output == "json"); err != nil {
		return err
	}
	return w.Flush()
}

// quotedNames lists context names for a message, each quoted: bitmap
// names come from the image.
func quotedNames(names []string) string {
	q := make([]string, len(names))
	for i, n := range names {
		q[i] = fmt.Sprintf("%q", n)
	}
	return strings.Join(q, ", ")
}
