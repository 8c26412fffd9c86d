package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/nbdgw/nbdgw/internal/backup"
	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
)

func cmdBackup(args []string) error {
	fs := newFlags("backup")
	imgFlags := addImageFlags(fs)
	layer := fs.Bool("layer", false, "copy only the top layer: local data, local zeroes as zero clusters, the rest unallocated")
	bitmap := fs.String("bitmap", "", "copy only the ranges dirty in the bitmap `NAME` (incremental backup)")
	backing := fs.String("backing", "", "OUT's backing `FILE` (the layer's base, or the previous backup), named relative to OUT")
	conns := fs.Int("connections", 4, "`N` NBD connections reading in parallel (where the server allows multiple connections)")
	var progress bool
	for _, name := range []string{"p", "progress"} {
		fs.BoolVar(&progress, name, false, "show a progress bar on a terminal")
	}
	opts := fs.String("o", "", "OUT's geometry `OPTS`: cluster_size=SIZE,extended_l2=on|off (default: follow the source)")
	force := fs.Bool("force", false, "replace OUT if it exists")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if err := wantArgs(pos, "SOURCE", "OUT.qcow2"); err != nil {
		return err
	}
	if *layer && *bitmap != "" {
		return usagef("--layer and --bitmap exclude each other")
	}
	if *conns < 1 {
		return usagef("--connections %d: want at least 1", *conns)
	}
	o := backup.Options{
		Mode:        backup.Full,
		Bitmap:      *bitmap,
		Backing:     *backing,
		Connections: *conns,
		Force:       *force,
		Image:       imgFlags.options(),
		Note:        func(s string) { fmt.Fprintln(os.Stderr, "nbdgw backup: "+s) },
	}
	switch {
	case *layer:
		o.Mode = backup.Layer
	case *bitmap != "":
		o.Mode = backup.Incremental
	}
	if nbdproto.IsURI(pos[0]) && (imgFlags.noBacking || imgFlags.format != "") {
		return usagef("--no-backing and -f apply to image files; serve the image with --no-backing instead")
	}
	if o.ClusterSize, o.ExtendedL2, err = backup.ParseCreateOptions(*opts); err != nil {
		return usagef("-o: %v", err)
	}
	tty := progress && isTerminal(os.Stderr)
	if tty {
		o.Progress = drawProgress
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	st, err := backup.Run(ctx, pos[0], pos[1], o)
	if tty {
		fmt.Fprintln(os.Stderr)
	}
	if err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("interrupted: %s not written", pos[1])
		}
		return fmt.Errorf("%w (%s not written)", err, pos[1])
	}
	fmt.Fprintln(os.Stderr, "nbdgw backup: "+st.String())
	return nil
}

func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// drawProgress redraws a one-line bar on standard error.
func drawProgress(done, total int64) {
	const width = 40
	frac := 1.0
	if total > 0 {
		frac = float64(done) / float64(total)
	}
	n := int(frac * width)
	fmt.Fprintf(os.Stderr, "\r[%s%s] %5.1f%%", strings.Repeat("#", n), strings.Repeat(" ", width-n), 100*frac)
}
