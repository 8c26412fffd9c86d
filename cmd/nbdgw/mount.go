package main

import (
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/nbdgw/nbdgw/fusefs"
	"github.com/nbdgw/nbdgw/qcow2"
)

// cmdMount serves the tree of an image until unmounted. With --writable
// the top layer is opened for writing and disk takes writes; on every way
// out (SIGINT, SIGTERM, SIGHUP, fusermount3 -u) the image is closed, which
// flushes it, before the process exits, and a failing final flush makes
// the exit status non-zero.
func cmdMount(args []string) (err error) {
	fs := newFlags("mount")
	imgFlags := addImageFlags(fs)
	writable := fs.Bool("writable", false, "allow writes to disk")
	debug := fs.Bool("debug", false, "log every FUSE request")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if err := wantArgs(pos, "IMAGE", "MOUNTPOINT"); err != nil {
		return err
	}
	path, dir := pos[0], pos[1]
	// Check the mount point before the (possibly slow) open, and again
	// in fusefs.Mount.
	if err := fusefs.CheckMountpoint(dir); err != nil {
		return err
	}
	opts := imgFlags.options()
	opts.Writable = *writable
	img, err := qcow2.Open(path, opts)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := img.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("closing %s: %w", path, cerr)
		}
	}()
	cfg := fusefs.Config{
		Name:  path,
		Logf:  func(format string, a ...any) { fmt.Fprintf(os.Stderr, "nbdgw mount: "+format+"\n", a...) },
		Debug: *debug,
	}
	if fi, err := os.Stat(path); err == nil {
		cfg.Time = fi.ModTime()
	}
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)
	srv, err := fusefs.Mount(dir, img, cfg)
	if err != nil {
		return err
	}
	// Said only once the mount is usable and nbdgw is done touching it:
	// the mount shows in /proc/self/mountinfo earlier, while go-fuse's
	// own first open is still in flight, and an unmount then is EBUSY.
	mode := "read-only"
	if *writable {
		mode = "writable"
	}
	fmt.Fprintf(os.Stderr, "nbdgw mount: %s mounted on %s (%s); unmount with fusermount3 -u %s or SIGINT\n", path, dir, mode, dir)
	done := make(chan struct{})
	go func() { srv.Wait(); close(done) }()
	for {
		select {
		case <-done:
			return nil
		case sig := <-sigs:
			// Whatever happens to the unmount (files in use keep the
			// mount busy), what was written so far is made durable now.
			if err := img.Flush(); err != nil {
				fmt.Fprintf(os.Stderr, "nbdgw mount: %v: flushing %s: %v\n", sig, path, err)
			}
			if err := unmountOnSignal(srv, done, sig); err != nil {
				return err
			}
		}
	}
}

// unmountOnSignal unmounts after SIGINT/SIGTERM/SIGHUP. While files of
// the mount are open the kernel refuses (EBUSY): retry for a while, then
// give up and keep serving rather than leave a dead mount behind.
func unmountOnSignal(srv *fusefs.Server, done <-chan struct{}, sig os.Signal) error {
	var err error
	for range 5 {
		if err = srv.Unmount(); err == nil {
			<-done
			return nil
		}
		select {
		case <-done:
			return nil
		case <-time.After(200 * time.Millisecond):
		}
	}
	msg := strings.Join(strings.Fields(err.Error()), " ") // fusermount's message spans lines
	fmt.Fprintf(os.Stderr, "nbdgw mount: %v: cannot unmount (%s); still serving: close the files in use and signal again\n", sig, msg)
	return nil
}
