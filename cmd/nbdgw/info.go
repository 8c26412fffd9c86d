package main

import (
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/nbdgw/nbdgw/qcow2"
)

func cmdInfo(args []string) error {
	fs := newFlags("info")
	output := fs.String("output", "human", "`FORMAT`: json or human")
	imgFlags := addImageFlags(fs)
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if err := wantArgs(pos, "IMAGE"); err != nil {
		return err
	}
	if *output != "json" && *output != "human" {
		return usagef("--output=%s: want json or human", *output)
	}
	img, err := qcow2.Open(pos[0], imgFlags.options())
	if err != nil {
		return err
	}
	defer img.Close()
	if *output == "json" {
		_, err = os.Stdout.Write(img.InfoJSON())
		return err
	}
	return writeInfoHuman(os.Stdout, img.Info())
}

func writeInfoHuman(w io.Writer, ci qcow2.ChainInfo) error {
	var b strings.Builder
	for i, l := range ci.Layers {
		if i > 0 {
			b.WriteString("\n")
		}
		fmt.Fprintf(&b, "layer %d: %s\n", l.Depth, qcow2.SafeName(l.Filename))
		fmt.Fprintf(&b, "  format:        %s\n", l.Format)
		fmt.Fprintf(&b, "  virtual size:  %d bytes\n", l.VirtualSize)
		fmt.Fprintf(&b, "  actual size:   %d bytes\n", l.ActualSize)
		if l.Format != "qcow2" {
			continue
		}
		fmt.Fprintf(&b, "  version:       %d\n", l.Version)
		fmt.Fprintf(&b, "  cluster size:  %d\n", l.ClusterSize)
		fmt.Fprintf(&b, "  refcount bits: %d\n", l.RefcountBits)
		fmt.Fprintf(&b, "  compression:   %s\n", l.Compression)
		if l.BackingFile != "" {
			fmt.Fprintf(&b, "  backing file:  %q", l.BackingFile)
			if l.BackingFormat != "" {
				fmt.Fprintf(&b, " (format %q)", l.BackingFormat)
			}
			b.WriteString("\n")
		}
		if l.DataFile != "" {
			fmt.Fprintf(&b, "  data file:     %s (raw: %t)\n", qcow2.SafeName(l.DataFile), l.DataFileRaw)
		}
		if len(l.Features) > 0 {
			fmt.Fprintf(&b, "  features:      %s\n", quoteAll(l.Features))
		}
		if l.Snapshots > 0 {
			fmt.Fprintf(&b, "  snapshots:     %d\n", l.Snapshots)
		}
		for _, bm := range l.Bitmaps {
			fmt.Fprintf(&b, "  bitmap:        %q (granularity %d, auto %t, in use %t)\n", bm.Name, bm.Granularity, bm.Auto, bm.InUse)
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// quoteAll joins feature names, quoting any that the image's feature name
// table made unprintable.
func quoteAll(names []string) string {
	out := make([]string, len(names))
	for i, n := range names {
		out[i] = qcow2.SafeName(n)
	}
	return strings.Join(out, ", ")
}
