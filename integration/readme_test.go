package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestREADMEJointAllocationExample rebuilds the README's joint-allocation
// example with qemu-img and qemu-io (seed 002's chain) and checks that the
// README shows exactly what nbdgw prints for it.
func TestREADMEJointAllocationExample(t *testing.T) {
	nbdRequire(t)
	bin := nbdgwBinary(t)
	readme, err := os.ReadFile(filepath.Join("..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	base, top := filepath.Join(dir, "base.raw"), filepath.Join(dir, "top.qcow2")
	runOutput(t, "qemu-img", "create", "-q", base, "256K")
	runOutput(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top)
	runOutput(t, "qemu-io", "-f", "raw", "-c", "write -P 65 0 64k", "-c", "write -P 66 64k 64k", "-c", "write -P 67 128k 64k", base)
	runOutput(t, "qemu-io", "-f", "qcow2", "-c", "write -P 69 64k 64k", "-c", "write -z 128k 64k", top)
	for _, ctx := range []string{"qemu:joint-allocation", "base:allocation"} {
		out := runOutput(t, bin, "map", "--context", ctx, top)
		var b strings.Builder
		b.WriteString("      $ nbdgw map --context " + ctx + " top.qcow2\n")
		for _, line := range strings.SplitAfter(string(out), "\n") {
			if line != "" {
				b.WriteString("      " + line)
			}
		}
		if !strings.Contains(string(readme), b.String()) {
			t.Errorf("README.md does not show what nbdgw prints:\n%s", b.String())
		}
	}
}
