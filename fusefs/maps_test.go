package fusefs

import (
	"bytes"
	"os/exec"
	"testing"

	"github.com/nbdgw/nbdgw/internal/metactx"
)

func TestMapFileName(t *testing.T) {
	tests := []struct {
		name string
		json bool
		want string
		ok   bool
	}{
		{metactx.BaseAllocation, false, "base-allocation", true},
		{metactx.AllocationDepth, true, "allocation-depth.json", true},
		{metactx.JointAllocation, false, "joint-allocation", true},
		{metactx.DirtyBitmapPrefix + "b0", false, "dirty-bitmap-b0", true},
		{metactx.DirtyBitmapPrefix + "a/b%c\x00", true, "dirty-bitmap-a%2Fb%25c%00.json", true},
		{metactx.DirtyBitmapPrefix + string(bytes.Repeat([]byte{'x'}, 243)), false, "dirty-bitmap-" + string(bytes.Repeat([]byte{'x'}, 243)), false},
	}
	for _, tc := range tests {
		got, ok := mapFileName(tc.name, tc.json)
		if ok != tc.ok || (ok && got != tc.want) {
			t.Errorf("mapFileName(%q, %v) = %q, %v; want %q, %v", tc.name, tc.json, got, ok, tc.want, tc.ok)
		}
	}
}

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
}
