package nbdproto

import "testing"

// TestIsURI: IsURI holds for what ParseURI accepts and for NBD URIs it
// rejects with a reason (so that the user sees that reason, not "no such
// file"), and not for image paths, however odd.
func TestIsURI(t *testing.T) {
	for _, s := range []string{
		"nbd://localhost", "nbd://127.0.0.1:10810/disk", "nbds://host/x",
		"nbd+unix:///?socket=/tmp/s", "nbds+unix:///e?socket=/tmp/s", "NBD://HOST",
	} {
		if _, err := ParseURI(s); err != nil {
			t.Errorf("ParseURI(%q): %v", s, err)
		}
		if !IsURI(s) {
			t.Errorf("IsURI(%q) = false for a URI ParseURI accepts", s)
		}
	}
	// NBD URIs that ParseURI refuses: still URIs, so the error is ParseURI's.
	for _, s := range []string{"nbd+unix://", "nbd://host?socket=/x"} {
		if _, err := ParseURI(s); err == nil {
			t.Errorf("ParseURI(%q) accepted", s)
		}
		if !IsURI(s) {
			t.Errorf("IsURI(%q) = false", s)
		}
	}
	for _, s := range []string{
		"disk.qcow2", "/var/lib/x.qcow2", "./nbd://x", "dir:/x://y", "nbd:x",
		"nbd:/x", "http://host/x.qcow2", "file:///x.qcow2", "", "nbd",
	} {
		if IsURI(s) {
			t.Errorf("IsURI(%q) = true for a path", s)
		}
	}
}
