package qcow2

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestCreate: images made by Create pass qemu-img check and read back as
// qemu-img info describes them.
func TestCreate(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img not installed")
	}
	d := t.TempDir()
	mustRun(t, d, "qemu-img", "create", "-f", "raw", "b.raw", "3M")
	for _, c := range []struct {
		name string
		o    CreateOptions
	}{
		{"plain", CreateOptions{Size: 10 << 20}},
		{"unaligned", CreateOptions{Size: 1000, ClusterBits: 9}},
		{"backing", CreateOptions{Size: 3 << 20, BackingFile: "b.raw", BackingFormat: "raw"}},
		{"big", CreateOptions{Size: 4 << 40, ClusterBits: 16}},
		{"empty", CreateOptions{Size: 0}},
		{"extended-l2", CreateOptions{Size: 100 << 20, ClusterBits: 15, ExtendedL2: true}},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := filepath.Join(d, c.name+".qcow2")
			if err := Create(f, c.o); err != nil {
				t.Fatal(err)
			}
			mustRun(t, d, "qemu-img", "check", f)
			out, _ := exec.Command("qemu-img", "info", f).CombinedOutput()
			if c.o.ExtendedL2 != strings.Contains(string(out), "extended l2: true") {
				t.Errorf("extended L2 %v, qemu-img info:\n%s", c.o.ExtendedL2, out)
			}
			if c.o.BackingFile != "" && !strings.Contains(string(out), "backing file: b.raw") {
				t.Errorf("qemu-img info:\n%s", out)
			}
		})
	}
}
