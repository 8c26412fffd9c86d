// Command skipcheck reads `go test -json` on stdin, prints what `go test`
// prints without -v (package results, and the output of failed tests),
// and fails when a test was skipped, except for the documented skips whose
// reason is the machine itself (listed in allowed). scripts/test.sh pipes
// the whole suite through it: on the CI machine every tool the tests need
// is installed, so a skip there means a part of the suite did not run.
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"regexp"
	"sort"
	"strings"
)

// allowed are the skips that are legitimately environmental: the test's
// premise does not hold on this kernel, and another test covers the case.
// A skip is allowed when its test name and the start of its reason match.
var allowed = []struct{ test, reason string }{
	// Needs a kernel without any nbd driver; with one, the VM test
	// (TestVM) covers attach against a kernel that has it.
	{"TestAttachWithoutNBD", "the host kernel has the nbd driver loaded"},
	{"TestAttachWithoutNBD", "the host kernel has a loadable nbd module"},
	// Needs a kernel without the nbd netlink family; a unit test does
	// not load kernel modules on the machine it runs on.
	{"TestOpenHostWithoutNBD", "the running kernel has the nbd family"},
	{"TestOpenHostWithoutNBD", "the running kernel has a loadable nbd module"},
}

type event struct {
	Action  string
	Package string
	Test    string
	Output  string
}

func main() {
	bad, err := check(os.Stdin, os.Stdout)
	if err != nil {
		fmt.Fprintln(os.Stderr, "skipcheck:", err)
		os.Exit(1)
	}
	if len(bad) > 0 {
		fmt.Printf("FAIL: %d skipped tests (a skip on the CI machine is a failure; see scripts/test.sh):\n", len(bad))
		for _, b := range bad {
			fmt.Println("  " + b)
		}
		os.Exit(1)
	}
}

// check copies the results of in to out and returns the disallowed skips.
func check(in io.Reader, out io.Writer) ([]string, error) {
	var bad []string
	logs := map[string]*strings.Builder{} // output per running test
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	for sc.Scan() {
		line := sc.Bytes()
		var ev event
		if err := json.Unmarshal(line, &ev); err != nil {
			// go build errors and the like arrive as plain text.
			fmt.Fprintf(out, "%s\n", line)
			continue
		}
		if ev.Test == "" {
			// Package results and, since Go 1.24, build output
			// ("build-output" events).
			fmt.Fprint(out, ev.Output)
			continue
		}
		key := ev.Package + " " + ev.Test
		switch ev.Action {
		case "output":
			b := logs[key]
			if b == nil {
				b = &strings.Builder{}
				logs[key] = b
			}
			b.WriteString(ev.Output)
		case "fail":
			if b := logs[key]; b != nil {
				fmt.Fprint(out, b.String())
			}
			delete(logs, key)
		case "skip":
			reason := skipReason(logs[key])
			if !isAllowed(ev.Test, reason) {
				bad = append(bad, fmt.Sprintf("%s %s: %s", ev.Package, ev.Test, reason))
			} else {
				fmt.Fprintf(out, "allowed skip: %s %s: %s\n", ev.Package, ev.Test, reason)
			}
			delete(logs, key)
		case "pass":
			delete(logs, key)
		}
	}
	// Tests without a result (a panic or a timeout killed the binary):
	// their output is what explains the failure.
	keys := make([]string, 0, len(logs))
	for k := range logs {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprint(out, logs[k].String())
	}
	return bad, sc.Err()
}

// logLine is a line of t.Log output: "    file_test.go:123: message".
var logLine = regexp.MustCompile(`^\s*[^\s:]+\.go:\d+: (.*)$`)

// skipReason is the message of the last t.Log line the test wrote before
// "--- SKIP": its t.Skip message (only its first line).
func skipReason(b *strings.Builder) string {
	reason := "(no reason given)"
	if b == nil {
		return reason
	}
	for _, l := range strings.Split(b.String(), "\n") {
		if m := logLine.FindStringSubmatch(l); m != nil {
			reason = m[1]
		}
	}
	return reason
}

func isAllowed(test, reason string) bool {
	for _, a := range allowed {
		if test == a.test && strings.HasPrefix(reason, a.reason) {
			return true
		}
	}
	return false
}
