// Command nbdgw is a block gateway for qcow2 disk images: it serves a qcow2
// backing chain over NBD, attaches it to the Linux nbd driver, mounts it
// with FUSE and prints its allocation maps. See DESIGN.md for the contract.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
)

// command is one subcommand. run parses its own flags from args.
type command struct {
	usage string
	run   func(args []string) error
}

// commands is the dispatch table. Each subcommand lives in its own file.
var commands = map[string]command{
	"map":    {"map [--output=json|human] [--context NAME] [--no-backing] IMAGE|NBD-URI", cmdMap},
	"info":   {"info [--output=json|human] [--no-backing] IMAGE", cmdInfo},
	"mount":  {"mount [--no-backing] [--writable] IMAGE MOUNTPOINT", cmdMount},
	"attach": {"attach [--device /dev/nbdN] [--connections N] [--writable] IMAGE|NBD-URI", cmdAttach},
	"detach": {"detach /dev/nbdN", cmdDetach},
	"list":   {"list", cmdList},
	"backup": {"backup [--layer] [--bitmap NAME] [--backing FILE] [--connections N] [-p|--progress] [-o OPTS] [--force] [--no-backing] [-f FORMAT] SOURCE OUT.qcow2", cmdBackup},
	"serve":  {"serve [--socket PATH | --listen HOST:PORT] [--export-name NAME] [--no-backing] [--writable] [--snapshot] [--tls-creds DIR [--tls-required]] IMAGE", cmdServe},
}

// errUsage makes main print the usage and exit 2 (flag errors are reported
// by the flag package already).
var errUsage = errors.New("usage")

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

func run(args []string, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stderr)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	c, ok := commands[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "nbdgw: unknown command %q\n", args[0])
		usage(stderr)
		return 2
	}
	if err := c.run(args[1:]); err != nil {
		if errors.Is(err, errUsage) || errors.Is(err, flag.ErrHelp) {
			fmt.Fprintf(stderr, "usage: nbdgw %s\n", c.usage)
			if errors.Is(err, flag.ErrHelp) {
				return 0
			}
			return 2
		}
		fmt.Fprintf(stderr, "nbdgw %s: %v\n", args[0], err)
		return 1
	}
	return 0
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: nbdgw COMMAND [options] ...")
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  nbdgw %s\n", commands[n].usage)
	}
}

// newFlags returns a flag set that reports errors instead of exiting, so
// every subcommand fails the same way.
func newFlags(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(os.Stderr)
	fs.Usage = func() {}
	return fs
}

// parseFlags parses args allowing flags after positional arguments
// (nbdgw map IMAGE --output=json), as GNU tools do.
func parseFlags(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		if args[0] == "--" {
			return append(pos, args[1:]...), nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}
