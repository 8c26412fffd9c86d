package main

import (
	"fmt"
	"io"
	"strings"
)

// The man pages in man/ are generated from the command table and the
// flag definitions (TestManPages keeps them in step; NBDGW_UPDATE_MAN=1 go
// test ./cmd/nbdgw rewrites them), so that they cannot drift from --help.

// commandFlags returns the flag entries of command name, as its --help
// lists them.
func commandFlags(name string) []flagEntry {
	lastFlags = nil
	commands[name].run([]string{"--help"})
	return flagEntries(lastFlags)
}

// roff escapes text for a man page line.
func roff(s string) string {
	s = strings.ReplaceAll(s, `\`, `\e`)
	s = strings.ReplaceAll(s, "-", `\-`)
	if strings.HasPrefix(s, ".") || strings.HasPrefix(s, "'") {
		s = `\&` + s
	}
	return s
}

// writeManPage writes nbdgw(1) for name "" and nbdgw-NAME(1) otherwise.
func writeManPage(w io.Writer, name string) {
	if name == "" {
		fmt.Fprintln(w, `.TH NBDGW 1 "" "nbdgw" "User Commands"`)
		fmt.Fprintln(w, ".SH NAME")
		fmt.Fprintln(w, `nbdgw \- block gateway for qcow2 disk images`)
		fmt.Fprintln(w, ".SH SYNOPSIS")
		fmt.Fprintln(w, ".B nbdgw\n.I COMMAND\n[options] ARGS...\n.br\n.B nbdgw \\-\\-version")
		fmt.Fprintln(w, ".SH DESCRIPTION")
		fmt.Fprintln(w, roff("One qcow2 backing-chain engine behind three doors: an NBD server, the Linux kernel's nbd driver, and a FUSE tree. Everything is read-only unless asked (--writable), and every file of the chain is locked with QEMU's protocol, so nbdgw and QEMU exclude each other as two QEMU processes do."))
		fmt.Fprintln(w, ".SH COMMANDS")
		for _, n := range commandNames() {
			fmt.Fprintf(w, ".TP\n.B %s\n%s (see \\fBnbdgw\\-%s\\fR(1)).\n", roff("nbdgw "+commands[n].usage), roff(commands[n].summary), n)
		}
		fmt.Fprintln(w, ".SH EXIT STATUS")
		fmt.Fprintln(w, "0 success, 1 runtime error, 2 usage error.")
		writeSeeAlso(w)
		return
	}
	c := commands[name]
	fmt.Fprintf(w, ".TH NBDGW\\-%s 1 \"\" \"nbdgw\" \"User Commands\"\n", strings.ToUpper(name))
	fmt.Fprintln(w, ".SH NAME")
	fmt.Fprintf(w, "nbdgw\\-%s \\- %s\n", name, roff(c.summary))
	fmt.Fprintln(w, ".SH SYNOPSIS")
	fmt.Fprintf(w, ".B %s\n", roff("nbdgw "+c.usage))
	if flags := commandFlags(name); len(flags) > 0 {
		fmt.Fprintln(w, ".SH OPTIONS")
		for _, e := range flags {
			fmt.Fprintf(w, ".TP\n.B %s\n%s\n", roff(e.names), roff(e.usage))
		}
	}
	fmt.Fprintln(w, ".SH EXIT STATUS")
	fmt.Fprintln(w, "0 success, 1 runtime error, 2 usage error.")
	writeSeeAlso(w)
}

func writeSeeAlso(w io.Writer) {
	fmt.Fprintln(w, ".SH SEE ALSO")
	fmt.Fprintln(w, `\fBnbdgw\fR(1), \fBqemu\-img\fR(1), \fBqemu\-nbd\fR(8), \fBnbdinfo\fR(1), \fBnbd\-client\fR(8)`)
}
