package main

import (
	"context"
	"fmt"
	"io"
	"os"

	"github.com/nbdgw/nbdgw/nbdserver/nbdclient"
	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
	"github.com/nbdgw/nbdgw/qcow2"
)

// cmdInfo is qemu-img info: the top layer (or with --backing-chain every
// layer) in qemu-img's human or JSON form. Like qemu-img info, it shows
// an image whose backing file is missing; it also warns.
func cmdInfo(args []string) error {
	fs := newFlags("info")
	output := fs.String("output", "human", "output `FORMAT`: human (qemu-img info's) or json (qemu-img info --output=json's, with an \"nbdgw\" key per image file)")
	chain := fs.Bool("backing-chain", false, "describe every layer of the backing chain, top first (JSON: a list), as qemu-img info --backing-chain")
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
	target := pos[0]
	var ci qcow2.ChainInfo
	if nbdproto.IsURI(target) {
		if f := imgFlags; f.forceShare || f.confine.set || f.noBacking || (f.format != "" && f.format != qcow2.FormatRaw) {
			return usagef("%s: an NBD export is read as raw; -f qcow2, -U, --confine and --no-backing apply to image files", target)
		}
		if ci, err = nbdInfo(target); err != nil {
			return err
		}
	} else {
		opts := imgFlags.options()
		// qemu-img info opens the image without its backing file; only
		// --backing-chain needs every layer.
		opts.TolerateMissingBacking = !*chain
		img, err := qcow2.Open(target, opts)
		if err != nil {
			return err
		}
		defer img.Close()
		if ci, err = img.Info(); err != nil {
			return err
		}
		if ci.MissingBacking != "" {
			owner := ci.Layers[len(ci.Layers)-1].Filename
			fmt.Fprintf(os.Stderr, "nbdgw: warning: backing file %s of %s does not exist\n", qcow2.SafeName(ci.MissingBacking), qcow2.SafeName(owner))
		}
	}
	if *output == "json" {
		_, err = os.Stdout.Write(ci.JSON(*chain))
		return err
	}
	_, err = io.WriteString(os.Stdout, ci.Human(*chain))
	return err
}

// nbdInfo asks the NBD server at uri for its export's size.
func nbdInfo(uri string) (qcow2.ChainInfo, error) {
	u, err := nbdproto.ParseURI(uri)
	if err != nil {
		return qcow2.ChainInfo{}, err
	}
	c, err := nbdclient.Dial(context.Background(), uri, nbdclient.Options{StructuredReplies: true})
	if err != nil {
		return qcow2.ChainInfo{}, err
	}
	defer c.Close()
	return qcow2.NBDExportInfo(qemuFilename(u), c.Size()), nil
}
