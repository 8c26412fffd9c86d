// Command nbdgw is a block gateway for qcow2 disk images: it serves a qcow2
// backing chain over NBD, attaches it to the Linux nbd driver, mounts it
// with FUSE and prints its allocation maps. `nbdgw help` lists the
// commands, `nbdgw help COMMAND` each one's flags.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"sort"
	"strings"
)

// command is one subcommand. run parses its own flags from args.
type command struct {
	usage   string // the synopsis after "nbdgw "
	summary string // one line for nbdgw help
	run     func(args []string) error
}

// commands is the dispatch table. Each subcommand lives in its own file.
var commands = map[string]command{
	"map": {"map [options] IMAGE|NBD-URI",
		"print the allocation map: qemu-img map's, or one metadata context as nbdinfo --map", cmdMap},
	"info": {"info [options] IMAGE|NBD-URI",
		"describe the image as qemu-img info does (--backing-chain: every layer)", cmdInfo},
	"mount": {"mount [options] IMAGE MOUNTPOINT",
		"mount the disk, its maps and layers with FUSE, until SIGINT/SIGTERM or fusermount3 -u", cmdMount},
	"attach": {"attach [options] IMAGE|NBD-URI",
		"attach to the kernel's nbd driver as /dev/nbdN, until SIGINT/SIGTERM or nbdgw detach", cmdAttach},
	"detach": {"detach /dev/nbdN", "disconnect an nbd device", cmdDetach},
	"list":   {"list", "list connected nbd devices", cmdList},
	"backup": {"backup [options] SOURCE OUT.qcow2",
		"copy an NBD export or image into a new qcow2: in full, one layer (--layer), or a bitmap's dirty ranges (--bitmap)", cmdBackup},
	"serve": {"serve [options] IMAGE | serve [options] --export NAME=IMAGE[,OPTION...] ... [--export-dir DIR]",
		"serve the image, or several exports, over NBD (TCP, unix socket, TLS) until SIGINT/SIGTERM", cmdServe},
}

// usageError is a mistake in the command line: main prints it on one
// line and exits 2.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error {
	return &usageError{fmt.Sprintf(format, args...)}
}

// wantArgs checks the number of positional arguments.
func wantArgs(pos []string, names ...string) error {
	if len(pos) == len(names) {
		return nil
	}
	if len(names) == 0 {
		return usagef("unexpected argument %q", pos[0])
	}
	if len(pos) < len(names) {
		return usagef("missing %s", strings.Join(names[len(pos):], " "))
	}
	return usagef("unexpected argument %q after %s", pos[len(names)], strings.Join(names, " "))
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		usage(stderr)
		return 2
	}
	switch args[0] {
	case "-h", "--help":
		usage(stdout)
		return 0
	case "-V", "--version", "version":
		fmt.Fprintln(stdout, version())
		return 0
	case "help":
		if len(args) == 1 {
			usage(stdout)
			return 0
		}
		if _, ok := commands[args[1]]; !ok {
			fmt.Fprintf(stderr, "nbdgw help: unknown command %q (commands: %s)\n", args[1], strings.Join(commandNames(), ", "))
			return 2
		}
		args = []string{args[1], "--help"}
	}
	c, ok := commands[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "nbdgw: unknown command %q (commands: %s; nbdgw help)\n", args[0], strings.Join(commandNames(), ", "))
		return 2
	}
	lastFlags = nil
	err := c.run(args[1:])
	var ue *usageError
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		commandHelp(stdout, args[0], c)
		return 0
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "nbdgw %s: %v (see nbdgw help %s)\n", args[0], err, args[0])
		return 2
	}
	fmt.Fprintf(stderr, "nbdgw %s: %v\n", args[0], err)
	return 1
}

func commandNames() []string {
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: nbdgw COMMAND [options] ARGS...    (nbdgw help COMMAND for its options)")
	fmt.Fprintln(w, "       nbdgw --version")
	fmt.Fprintln(w, "\nCommands:")
	for _, n := range commandNames() {
		fmt.Fprintf(w, "  %-8s %s\n", n, commands[n].summary)
	}
	fmt.Fprintln(w, "\nRead-only unless --writable; images are locked as QEMU locks them.")
}

// version is the module version and VCS revision from the build info.
func version() string {
	v, rev, dirty := "(devel)", "", false
	if bi, ok := debug.ReadBuildInfo(); ok {
		if bi.Main.Version != "" {
			v = bi.Main.Version
		}
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				rev = s.Value
			case "vcs.modified":
				dirty = s.Value == "true"
			}
		}
	}
	out := "nbdgw " + v
	if rev != "" {
		out += " (revision " + rev
		if dirty {
			out += ", modified"
		}
		out += ")"
	}
	return out
}

// lastFlags is the flag set the running command made, for its --help.
var lastFlags *flag.FlagSet

// newFlags returns a flag set that reports errors instead of printing or
// exiting, so every subcommand fails the same way.
func newFlags(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	lastFlags = fs
	return fs
}

// parseFlags parses args allowing flags after positional arguments
// (nbdgw map IMAGE --output=json), as GNU tools do.
func parseFlags(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			return nil, &usageError{err.Error()}
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

// commandHelp prints a command's synopsis and every flag with its
// default and meaning. Flags that share one value (-k and --socket) are
// one entry.
func commandHelp(w io.Writer, name string, c command) {
	fmt.Fprintf(w, "usage: nbdgw %s\n%s.\n", c.usage, upperFirst(c.summary))
	for _, e := range flagEntries(lastFlags) {
		if e.names == "" {
			continue
		}
		if len(e.names) <= 28 {
			fmt.Fprintf(w, "  %-28s %s\n", e.names, e.usage)
		} else {
			fmt.Fprintf(w, "  %s\n  %-28s %s\n", e.names, "", e.usage)
		}
	}
}

type flagEntry struct{ names, usage, key string }

// flagEntries groups the flags of fs by value, short names first.
func flagEntries(fs *flag.FlagSet) []flagEntry {
	if fs == nil {
		return nil
	}
	type group struct {
		flags []*flag.Flag
	}
	var order []flag.Value
	groups := map[flag.Value]*group{}
	fs.VisitAll(func(f *flag.Flag) {
		g, ok := groups[f.Value]
		if !ok {
			g = &group{}
			groups[f.Value] = g
			order = append(order, f.Value)
		}
		g.flags = append(g.flags, f)
	})
	var out []flagEntry
	for _, v := range order {
		fl := groups[v].flags
		sort.SliceStable(fl, func(i, j int) bool { return len(fl[i].Name) < len(fl[j].Name) })
		doc := fl[len(fl)-1] // the long name carries the usage text
		arg, meaning := flag.UnquoteUsage(doc)
		if isBool(doc) {
			arg = ""
		} else if _, ok := doc.Value.(*confineFlag); ok {
			arg = "[=DIR]"
		}
		var names []string
		for _, f := range fl {
			n := "--" + f.Name
			if len(f.Name) == 1 {
				n = "-" + f.Name
			}
			names = append(names, n)
		}
		s := strings.Join(names, ", ")
		if arg != "" && !strings.HasPrefix(arg, "[") {
			s += " " + arg
		} else {
			s += arg
		}
		if d := doc.DefValue; d != "" && d != "false" && d != "0" && !strings.Contains(meaning, "default") {
			meaning += " (default " + d + ")"
		}
		out = append(out, flagEntry{s, meaning, doc.Name})
	}
	// In the order of the long names, as --help of GNU tools.
	sort.SliceStable(out, func(i, j int) bool {
		return out[i].key < out[j].key
	})
	return out
}

func isBool(f *flag.Flag) bool {
	b, ok := f.Value.(interface{ IsBoolFlag() bool })
	_, confine := f.Value.(*confineFlag)
	return ok && b.IsBoolFlag() && !confine
}

func upperFirst(s string) string {
	if s == "" {
		return s
	}
	return strings.ToUpper(s[:1]) + s[1:]
}
