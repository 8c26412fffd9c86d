package gnutlspsk

import (
	"bytes"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	k, err := parse([]byte("alice:0011aabb\n\nbob:with:colon:FF\r\n"))
	if err != nil {
		t.Fatal(err)
	}
	if key, ok := k.Key("alice"); !ok || !bytes.Equal(key, []byte{0, 0x11, 0xaa, 0xbb}) {
		t.Errorf("alice: %x %v", key, ok)
	}
	if key, ok := k.Key("bob:with:colon"); !ok || !bytes.Equal(key, []byte{0xff}) {
		t.Errorf("bob: %x %v", key, ok)
	}
	for _, c := range []struct{ in, want string }{
		{"", "no username:hexkey line"},
		{"\n\n", "no username:hexkey line"},
		{"alice", "line 1: not username:hexkey"},
		{":00", "line 1: empty username"},
		{"a:00\nalice:", `line 2: empty key for "alice"`},
		{"alice:0g", "not an even number of hex digits"},
		{"alice:001", "not an even number of hex digits"},
		{"alice:00\nalice:11", `line 2: username "alice" appears twice`},
	} {
		_, err := parse([]byte(c.in))
		if err == nil || !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("parse(%q) = %v, want %q", c.in, err, c.want)
		}
	}
}
