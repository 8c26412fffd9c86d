package metactx

import (
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/nbdgw/nbdgw/qcow2"
)

// TestWalkLimit: a bounded walk stops after its budget of engine lookups,
// reports how far it got, and resuming from there gives the same map as
// an unbounded walk (after coalescing).
func TestWalkLimit(t *testing.T) {
	if _, err := exec.LookPath("qemu-io"); err != nil {
		t.Skip("qemu-io not installed")
	}
	d := t.TempDir()
	f := filepath.Join(d, "a.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4k", f, "4M").CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	// Data clusters written in reverse order get descending host
	// offsets: each is its own engine extent, yet base:allocation
	// coalesces the first 1 MiB into one extent.
	var args []string
	for i := 255; i >= 0; i-- {
		args = append(args, "-c", "w -P 1 "+strconv.Itoa(i*4096)+" 4k")
	}
	if out, err := exec.Command("qemu-io", append(append([]string{"-f", "qcow2"}, args...), f)...).CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	im, err := qcow2.Open(f, qcow2.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	type ext struct {
		off, n int64
		f      uint32
	}
	var all []ext
	Walk(im, BaseAllocation, 0, im.Size(), func(o, n int64, fl uint32) error {
		all = append(all, ext{o, n, fl})
		return nil
	})
	if len(all) != 2 {
		t.Fatalf("unbounded walk: %v, want data then hole", all)
	}
	var pieces []ext
	walks := 0
	for pos := int64(0); pos < im.Size(); walks++ {
		end, err := WalkLimit(im, BaseAllocation, pos, im.Size()-pos, 10, func(o, n int64, fl uint32) error {
			if k := len(pieces) - 1; k >= 0 && pieces[k].f == fl && pieces[k].off+pieces[k].n == o {
				pieces[k].n += n
			} else {
				pieces = append(pieces, ext{o, n, fl})
			}
			return nil
		})
		if err != nil || end <= pos {
			t.Fatalf("WalkLimit from %d: end %d, %v", pos, end, err)
		}
		if end < im.Size() && end != pos+10*4096 {
			t.Fatalf("walk from %d stopped at %d, want after 10 clusters", pos, end)
		}
		pos = end
	}
	if walks < 26 {
		t.Errorf("%d bounded walks: the budget did not bound them", walks)
	}
	if len(pieces) != len(all) {
		t.Fatalf("bounded walks gave %v, unbounded %v", pieces, all)
	}
	for i := range all {
		if pieces[i] != all[i] {
			t.Fatalf("bounded walks gave %v, unbounded %v", pieces, all)
		}
	}
}
