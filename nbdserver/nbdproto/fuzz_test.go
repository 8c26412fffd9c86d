package nbdproto

import (
	"bytes"
	"testing"
)

// FuzzDecode runs every decoder on arbitrary bytes and checks that what
// decodes re-encodes to the same bytes.
func FuzzDecode(f *testing.F) {
	f.Add(byte(0), Request{Type: CmdRead, Cookie: 1, Offset: 2, Length: 3}.Append(nil, false))
	f.Add(byte(1), Request{Type: CmdBlockStatus, Flags: CmdFlagPayloadLen, Length: 12}.Append(nil, true))
	f.Add(byte(2), MetaContextRequest{Export: "x", Queries: []string{"qemu:"}}.Append(nil))
	f.Add(byte(3), InfoRequest{Export: "x", Infos: []Info{1, 3}}.Append(nil))
	f.Add(byte(4), BlockStatusPayload{Length: 9, IDs: []uint32{1, 2}}.Append(nil))
	f.Add(byte(5), AppendChunkHeader(nil, ModeExtended, 1, 6, 7, 8, 9))
	f.Add(byte(6), []byte{0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0})
	f.Add(byte(7), []byte{0, 0, 0, 22, 0, 2, 'h', 'i'})
	f.Fuzz(func(t *testing.T, kind byte, b []byte) {
		switch kind % 9 {
		case 0, 1:
			ext := kind%9 == 1
			if r, err := DecodeRequest(b, ext); err == nil {
				n := RequestLen
				if ext {
					n = ExtendedRequestLen
				}
				if got := r.Append(nil, ext); !bytes.Equal(got, b[:n]) {
					t.Fatalf("request re-encodes to %x, want %x", got, b[:n])
				}
			}
		case 2:
			if m, err := DecodeMetaContextRequest(b); err == nil && !bytes.Equal(m.Append(nil), b) {
				t.Fatal("meta context request does not round-trip")
			}
		case 3:
			if r, err := DecodeInfoRequest(b); err == nil && !bytes.Equal(r.Append(nil), b) {
				t.Fatal("info request does not round-trip")
			}
		case 4:
			if p, err := DecodeBlockStatusPayload(b); err == nil && !bytes.Equal(p.Append(nil), b) {
				t.Fatal("block status payload does not round-trip")
			}
		case 5:
			DecodeReplyHeader(b)
		case 6, 7:
			DecodeBlockStatus(b, kind%9 == 7)
		case 8:
			DecodeErrorPayload(b)
			DecodeOptHeader(b)
			DecodeOptReply(b)
		}
	})
}

// FuzzParseURI checks that URI parsing never panics and that what parses
// has a network and an address.
func FuzzParseURI(f *testing.F) {
	for _, s := range []string{"nbd://host:1234/exp", "nbds+unix:///e?socket=/s&tls-certificates=/d", "nbd://[::1]/", "nbd+unix://?socket=%00abs"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		u, err := ParseURI(s)
		if err == nil && (u.Network == "" || u.Address == "") {
			t.Fatalf("%q parsed to %+v", s, u)
		}
	})
}
