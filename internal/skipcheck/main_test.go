package main

import (
	"encoding/json"
	"strings"
	"testing"
)

func events(evs ...event) string {
	var b strings.Builder
	for _, e := range evs {
		j, _ := json.Marshal(e)
		b.Write(j)
		b.WriteByte('\n')
	}
	return b.String()
}

// TestCheck: a skip fails unless allowed (test and reason), failures keep
// their output, passes print nothing but the package line.
func TestCheck(t *testing.T) {
	const pkg = "example.com/p"
	in := events(
		event{Action: "run", Package: pkg, Test: "TestA"},
		event{Action: "output", Package: pkg, Test: "TestA", Output: "=== RUN   TestA\n"},
		event{Action: "output", Package: pkg, Test: "TestA", Output: "    a_test.go:12: no /dev/fuse: stat /dev/fuse: no such file\n"},
		event{Action: "output", Package: pkg, Test: "TestA", Output: "--- SKIP: TestA (0.00s)\n"},
		event{Action: "skip", Package: pkg, Test: "TestA"},
		event{Action: "output", Package: pkg, Test: "TestAttachWithoutNBD", Output: "    vm_test.go:112: the host kernel has the nbd driver loaded\n"},
		event{Action: "skip", Package: pkg, Test: "TestAttachWithoutNBD"},
		event{Action: "output", Package: pkg, Test: "TestB/sub", Output: "    b_test.go:3: the host kernel has the nbd driver loaded\n"},
		event{Action: "skip", Package: pkg, Test: "TestB/sub"},
		event{Action: "output", Package: pkg, Test: "TestC", Output: "    c_test.go:9: boom\n"},
		event{Action: "fail", Package: pkg, Test: "TestC"},
		event{Action: "output", Package: pkg, Test: "TestD", Output: "    d_test.go:9: chatter\n"},
		event{Action: "pass", Package: pkg, Test: "TestD"},
		event{Action: "output", Package: pkg, Test: "TestE", Output: "panic: test timed out after 1s\n"},
		event{Action: "output", Package: pkg, Output: "FAIL\texample.com/p\t0.1s\n"},
	) + "# example.com/q\nq.go:1: syntax error\n"
	var out strings.Builder
	bad, err := check(strings.NewReader(in), &out)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		pkg + " TestA: no /dev/fuse: stat /dev/fuse: no such file",
		pkg + " TestB/sub: the host kernel has the nbd driver loaded",
	}
	if strings.Join(bad, "\n") != strings.Join(want, "\n") {
		t.Errorf("disallowed skips:\n%s\nwant:\n%s", strings.Join(bad, "\n"), strings.Join(want, "\n"))
	}
	o := out.String()
	for _, s := range []string{"c_test.go:9: boom", "FAIL\texample.com/p", "allowed skip: " + pkg + " TestAttachWithoutNBD", "q.go:1: syntax error", "panic: test timed out"} {
		if !strings.Contains(o, s) {
			t.Errorf("output lacks %q:\n%s", s, o)
		}
	}
	if strings.Contains(o, "chatter") {
		t.Errorf("output shows a passing test's log:\n%s", o)
	}
}
