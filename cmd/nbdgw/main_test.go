package main

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func runCLI(args ...string) (code int, stdout, stderr string) {
	var o, e bytes.Buffer
	code = run(args, &o, &e)
	return code, o.String(), e.String()
}

// Every command's help is on stdout, exits 0, and lists every flag of
// the command with its meaning; help CMD and CMD --help agree.
func TestHelpListsEveryFlag(t *testing.T) {
	for _, name := range commandNames() {
		code, out, errOut := runCLI("help", name)
		if code != 0 || errOut != "" || !strings.HasPrefix(out, "usage: nbdgw "+name) {
			t.Fatalf("help %s: exit %d, stdout %q, stderr %q", name, code, out, errOut)
		}
		if c2, out2, _ := runCLI(name, "--help"); c2 != 0 || out2 != out {
			t.Errorf("%s --help: exit %d, differs from help %s:\n%s", name, c2, name, out2)
		}
		// The flag set the command made: every name must be in the help.
		lastFlags.VisitAll(func(f *flag.Flag) {
			spelled := "--" + f.Name
			if len(f.Name) == 1 {
				spelled = "-" + f.Name
			}
			if !strings.Contains(out, spelled) {
				t.Errorf("help %s does not list %s", name, spelled)
			}
		})
		for _, line := range strings.Split(strings.TrimSpace(out), "\n")[2:] {
			if f := strings.Fields(line); len(f) < 2 {
				t.Errorf("help %s: flag without a meaning: %q", name, line)
			}
		}
	}
	_, out, _ := runCLI("help", "serve")
	for _, want := range []string{"(default 127.0.0.1:10809)", "-k, --socket PATH", "--tls-verify-peer", "(default 10s)"} {
		if !strings.Contains(out, want) {
			t.Errorf("help serve lacks %q:\n%s", want, out)
		}
	}
	if _, out, _ := runCLI("help", "mount"); !strings.Contains(out, "--debug") {
		t.Errorf("help mount lacks --debug:\n%s", out)
	}
}

func TestTopLevel(t *testing.T) {
	if code, out, _ := runCLI("--help"); code != 0 || !strings.Contains(out, "serve ") {
		t.Errorf("--help: exit %d, %q", code, out)
	}
	if code, out, _ := runCLI("help"); code != 0 || !strings.Contains(out, "Commands:") {
		t.Errorf("help: exit %d, %q", code, out)
	}
	if code, out, errOut := runCLI(); code != 2 || out != "" || !strings.Contains(errOut, "usage:") {
		t.Errorf("no arguments: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	for _, v := range []string{"-V", "--version"} {
		if code, out, _ := runCLI(v); code != 0 || !strings.HasPrefix(out, "nbdgw ") {
			t.Errorf("%s: exit %d, %q", v, code, out)
		}
	}
}

// Usage errors exit 2 with one line that says what is wrong; runtime
// errors exit 1.
func TestExitCodes(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "missing.qcow2")
	tests := []struct {
		args []string
		code int
		want string
	}{
		{[]string{"bogus"}, 2, `unknown command "bogus"`},
		{[]string{"help", "bogus"}, 2, `unknown command "bogus"`},
		{[]string{"info", "-bogus", "x"}, 2, "flag provided but not defined: -bogus"},
		{[]string{"info"}, 2, "missing IMAGE"},
		{[]string{"info", "a", "b"}, 2, `unexpected argument "b" after IMAGE`},
		{[]string{"map", "--output=xml", "x"}, 2, "--output=xml: want json or human"},
		{[]string{"map", "--totals", "x"}, 2, "--totals needs --context"},
		{[]string{"mount", "x"}, 2, "missing MOUNTPOINT"},
		{[]string{"serve", "--socket", "/tmp/s", "--listen", "127.0.0.1:1", "x"}, 2, "--socket excludes --listen"},
		{[]string{"serve", "-k", "/tmp/s", "-p", "1", "x"}, 2, "--socket excludes"},
		{[]string{"serve", "--listen", "127.0.0.1:1", "-b", "127.0.0.1", "x"}, 2, "--listen HOST:PORT excludes"},
		{[]string{"serve", "--writable", "--snapshot", "x"}, 2, "exclude each other"},
		{[]string{"serve", "-r", "--writable", "x"}, 2, "--read-only excludes"},
		{[]string{"serve", "--tls-required", "x"}, 2, "--tls-required needs --tls-creds or --tls-psk"},
		{[]string{"serve", "--tls-creds", "d", "--tls-psk", "f", "x"}, 2, "--tls-creds and --tls-psk exclude each other"},
		{[]string{"attach", "--connections", "0", "x"}, 2, "want at least 1"},
		{[]string{"attach", "--tls-creds", "d", "--tls-psk", "f", "nbds://h/"}, 2, "--tls-creds and --tls-psk exclude each other"},
		{[]string{"attach", "--tls-creds", "d", "nbd://h/"}, 2, "are for nbds:// and nbds+unix:// URIs"},
		{[]string{"attach", "--tls-psk", "f", "x.qcow2"}, 2, "are for nbds:// and nbds+unix:// URIs"},
		{[]string{"list", "extra"}, 2, `unexpected argument "extra"`},
		{[]string{"map", "--no-backing", "nbd://localhost"}, 2, "--no-backing applies to image files"},
		{[]string{"info", missing}, 1, "no such file or directory"},
		{[]string{"map", missing}, 1, "no such file or directory"},
	}
	for _, tc := range tests {
		code, out, errOut := runCLI(tc.args...)
		if code != tc.code || out != "" || !strings.Contains(errOut, tc.want) ||
			strings.Count(errOut, "\n") != 1 {
			t.Errorf("nbdgw %s: exit %d, stdout %q, stderr %q; want exit %d and one line with %q",
				strings.Join(tc.args, " "), code, out, errOut, tc.code, tc.want)
		}
	}
}

// TestManPages: man/*.1 are what the flag definitions generate.
func TestManPages(t *testing.T) {
	dir := filepath.Join("..", "..", "man")
	for _, name := range append([]string{""}, commandNames()...) {
		file := "nbdgw.1"
		if name != "" {
			file = "nbdgw-" + name + ".1"
		}
		var b bytes.Buffer
		writeManPage(&b, name)
		path := filepath.Join(dir, file)
		if os.Getenv("NBDGW_UPDATE_MAN") != "" {
			if err := os.MkdirAll(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(path, b.Bytes(), 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		got, err := os.ReadFile(path)
		if err != nil || !bytes.Equal(got, b.Bytes()) {
			t.Errorf("%s is not what the flag definitions generate (%v): run NBDGW_UPDATE_MAN=1 go test ./cmd/nbdgw", path, err)
		}
		if name != "" {
			for _, e := range commandFlags(name) {
				if !bytes.Contains(got, []byte(roff(e.names))) {
					t.Errorf("%s lacks %s", path, e.names)
				}
			}
		}
	}
}
