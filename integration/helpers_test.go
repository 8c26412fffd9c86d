package integration

// Helpers shared by the integration tests.

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
)

var (
	binOnce sync.Once
	binPath string
	binErr  error
)

// nbdgwBinary builds nbdgw once per test process into
// $TMPDIR/nbdgw-hardening-PID (the package has no TestMain to remove it,
// so each run removes the directories of processes that are gone).
func nbdgwBinary(t testing.TB) string {
	t.Helper()
	binOnce.Do(func() {
		old, _ := filepath.Glob(filepath.Join(os.TempDir(), "nbdgw-hardening-*"))
		for _, d := range old {
			pid, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(d), "nbdgw-hardening-"))
			if err != nil || pid <= 0 || pid > 1<<22 { // not a pid (pid_max is at most 2^22)
				continue
			}
			if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); errors.Is(err, os.ErrNotExist) {
				os.RemoveAll(d)
			}
		}
		dir := filepath.Join(os.TempDir(), fmt.Sprintf("nbdgw-hardening-%d", os.Getpid()))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			binErr = err
			return
		}
		binPath = filepath.Join(dir, "nbdgw")
		out, err := exec.Command("go", "build", "-o", binPath, "github.com/nbdgw/nbdgw/cmd/nbdgw").CombinedOutput()
		if err != nil {
			binErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binPath
}

// lockedBuffer collects a child's output; it may be read while the child
// still writes.
type lockedBuffer struct {
	mu sync.Mutex // guards b
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// Bytes returns a copy of what was written so far.
func (l *lockedBuffer) Bytes() []byte {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]byte(nil), l.b.Bytes()...)
}

// runOutput runs a program and returns its standard output, failing the
// test with its standard error if it fails.
func runOutput(t testing.TB, name string, args ...string) []byte {
	t.Helper()
	out, err := exec.Command(name, args...).Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		t.Fatalf("%s %q: %v\n%s", name, args, err, stderr)
	}
	return out
}

// serveSaid is what nbdgw serve wrote to stderr but its ready line.
func serveSaid(stderr string) string {
	var keep []string
	for _, l := range strings.SplitAfter(stderr, "\n") {
		if l != "" && !strings.HasPrefix(l, "nbdgw serve: serving ") {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "")
}
