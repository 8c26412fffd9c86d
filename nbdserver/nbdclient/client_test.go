package nbdclient

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/nbdgw/nbdgw/internal/metactx"
	"github.com/nbdgw/nbdgw/nbdserver"
	"github.com/nbdgw/nbdgw/qcow2"
)

// run runs a command, failing the test on error.
func run(t testing.TB, name string, args ...string) {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
}

// startServer serves cfg on a unix socket and returns its URI.
func startServer(t testing.TB, cfg nbdserver.Config) string {
	t.Helper()
	cfg.Logf = t.Logf
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := nbdserver.NewServer(cfg)
	done := make(chan error, 1)
	go func() { done <- srv.Serve(context.Background(), l) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-done; err != nil && !errors.Is(err, nbdserver.ErrServerClosed) {
			t.Errorf("Serve: %v", err)
		}
	})
	return "nbd+unix:///?socket=" + sock
}

// TestExtendedWholeExport maps a large sparse export with many extents in
// one BLOCK_STATUS round trip with extended headers; 32-bit mode needs
// several, each under 4 GiB.
func TestExtendedWholeExport(t *testing.T) {
	p := filepath.Join(t.TempDir(), "big.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "64G")
	var cmds []string
	for i := range 64 {
		cmds = append(cmds, "-c", fmt.Sprintf("write -P 1 %d 64k", int64(i)<<30))
	}
	run(t, "qemu-io", append(cmds, p)...)
	img, err := qcow2.Open(p, qcow2.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() }) // after the server stops
	uri := startServer(t, nbdserver.Config{Exports: []*nbdserver.Export{{Image: img}}})
	for _, tc := range []struct {
		opts       Options
		roundTrips int
	}{
		{Options{ExtendedHeaders: true}, 1},
		{Options{StructuredReplies: true}, 32}, // 2 GiB requests
	} {
		tc.opts.MetaContexts = []string{metactx.BaseAllocation}
		c, err := Dial(context.Background(), uri, tc.opts)
		if err != nil {
			t.Fatal(err)
		}
		trips, extents := 0, 0
		for off := int64(0); off < c.Size(); trips++ {
			c.mu.Lock()
			n, err := c.blockStatus(0, off, c.Size()-off, func(_, _ int64, _ uint32) error { extents++; return nil })
			c.mu.Unlock()
			if err != nil {
				t.Fatal(err)
			}
			off += n
		}
		c.Close()
		if trips != tc.roundTrips || extents != 128 {
			t.Errorf("mode %v: %d round trips, %d extents; want %d, 128", c.Mode(), trips, extents, tc.roundTrips)
		}
	}
}
