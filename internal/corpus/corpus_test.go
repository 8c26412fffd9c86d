package corpus

import (
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/nbdgw/nbdgw/qcow2"
)

// TestCorpusEngine opens every crafted image with the engine directly:
// the stage each case declares must be where the engine fails, with an
// error that names the broken structure and wraps one of the engine's
// sentinels (or an OS error for a missing file). The front ends are
// driven by integration/hardening_test.go.
func TestCorpusEngine(t *testing.T) {
	for _, tool := range []string{"qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed", tool)
		}
	}
	cases, err := Generate(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if len(cases) < 30 {
		t.Errorf("%d cases, want at least 30", len(cases))
	}
	for _, c := range cases {
		t.Run(c.Name, func(t *testing.T) {
			mentions := func(err error) {
				t.Helper()
				for _, w := range c.Want {
					if !strings.Contains(strings.ToLower(err.Error()), strings.ToLower(w)) {
						t.Errorf("error %q does not mention %q", err, w)
					}
				}
				// The engine's contract (qcow2/errors.go): every error for
				// a bad image wraps one of its sentinels; a file that
				// cannot be opened is an OS error.
				var pe *os.PathError
				sentinel := false
				for _, s := range []error{qcow2.ErrNotQcow2, qcow2.ErrUnsupported, qcow2.ErrCorrupt, qcow2.ErrBackingChain} {
					sentinel = sentinel || errors.Is(err, s)
				}
				if !sentinel && !errors.As(err, &pe) {
					t.Errorf("error %q wraps none of the engine's sentinels (ErrNotQcow2, ErrUnsupported, ErrCorrupt, ErrBackingChain) nor an OS error", err)
				}
			}
			var img *qcow2.Image
			err := within(t, func() error {
				var err error
				img, err = qcow2.Open(c.Image, qcow2.Options{Warn: func(string) {}})
				return err
			})
			if c.Stage == Open {
				if err == nil {
					img.Close()
					t.Fatal("opened")
				}
				mentions(err)
				return
			}
			if err != nil {
				t.Fatalf("open: %v", err)
			}
			img.Close()
			err = within(t, func() error { return exercise(c.Image, qcow2.Options{}) })
			switch c.Stage {
			case Read, Bitmap:
				if err == nil {
					t.Fatal("read and mapped without error")
				}
				mentions(err)
			case Accept:
				if err != nil {
					t.Errorf("QEMU reads this image; the engine says %v", err)
				}
			}
		})
	}
}

// within runs fn with a deadline; a hang fails the test (and leaks the
// goroutine, which cannot be stopped).
func within(t *testing.T, fn func() error) error {
	t.Helper()
	ch := make(chan error, 1)
	go func() { ch <- fn() }()
	select {
	case err := <-ch:
		return err
	case <-time.After(20 * time.Second):
		t.Fatalf("HANG: no answer in 20 s")
		return nil
	}
}
