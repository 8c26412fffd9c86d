package main

import (
	"flag"

	"github.com/nbdgw/nbdgw/qcow2"
)

// imageFlags are the flags every command that opens an image shares
// (DESIGN.md's command-line contract): -f/--format, -U/--force-share,
// --confine[=DIR] and --no-backing.
type imageFlags struct {
	format     string
	forceShare bool
	confine    confineFlag
	noBacking  bool
}

// addImageFlags registers the shared image flags on fs.
func addImageFlags(fs *flag.FlagSet) *imageFlags {
	f := &imageFlags{}
	for _, name := range []string{"f", "format"} {
		fs.StringVar(&f.format, name, "", "image `FORMAT`: raw or qcow2 (default: probe as QEMU does)")
	}
	for _, name := range []string{"U", "force-share"} {
		fs.BoolVar(&f.forceShare, name, false, "open read-only, ignoring other processes' image locks (answers may be inconsistent)")
	}
	fs.Var(&f.confine, "confine", "every file of the chain must resolve inside DIR (default: the image's directory) and be a regular file")
	fs.BoolVar(&f.noBacking, "no-backing", false, "open the top layer alone")
	return f
}

// options returns the qcow2.Options these flags ask for.
func (f *imageFlags) options() qcow2.Options {
	return qcow2.Options{
		Format:     f.format,
		ForceShare: f.forceShare,
		Confine:    f.confine.set,
		ConfineDir: f.confine.dir,
		NoBacking:  f.noBacking,
	}
}

// confineFlag is --confine[=DIR]: a bool flag that may carry a value.
type confineFlag struct {
	set bool
	dir string
}

func (c *confineFlag) String() string { return c.dir }

func (c *confineFlag) Set(s string) error {
	c.set = true
	if s != "true" {
		c.dir = s
	}
	return nil
}

// IsBoolFlag lets --confine stand alone (the flag package then passes "true").
func (c *confineFlag) IsBoolFlag() bool { return true }
