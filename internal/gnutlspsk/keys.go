// Package gnutlspsk is TLS with pre-shared keys (TLS-PSK, RFC 4279 and
// TLS 1.3's external PSKs) for NBD, through GnuTLS: Go's crypto/tls has
// no PSK key exchange (golang/go#6379). It speaks what QEMU's
// tls-creds-psk and libnbd/nbdkit's --tls-psk speak: the GnuTLS priority
// "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK" and key files of "username:hexkey"
// lines, as GnuTLS's psktool writes them.
//
// GnuTLS is reached through cgo. A build without cgo (CGO_ENABLED=0, as
// the static nbdgw of the VM test) compiles, and Load then fails with
// ErrNoCgo, so that nbdgw refuses --tls-psk at start.
package gnutlspsk

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
)

// ErrNoCgo is Load's error in a build without cgo.
var ErrNoCgo = errors.New("this nbdgw was built without cgo: TLS-PSK needs GnuTLS")

// Priority is the GnuTLS priority string of every session: QEMU's for
// tls-creds-psk without a priority property (CONFIG_TLS_PRIORITY "NORMAL"
// plus its TLS_PRIORITY_ADDITIONAL_PSK), which libnbd and nbdkit use too.
const Priority = "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK"

// DefaultUsername is the username QEMU's tls-creds-psk sends when its
// username property is not set.
const DefaultUsername = "qemu"

// Keys are the pre-shared keys of a key file, by username.
type Keys struct {
	Path string
	keys map[string][]byte
}

// Load reads and checks a key file: every non-empty line is
// username:hexkey, with a non-empty username and key, the key an even
// number of hex digits, no username twice, and at least one key. The
// username is everything before the line's last colon (hex has none), as
// GnuTLS's own file lookup matches any username followed by a colon.
// Errors are one line naming the file and the line.
func Load(path string) (*Keys, error) {
	if err := available(); err != nil {
		return nil, err
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("TLS-PSK key file: %w", err)
	}
	k, err := parse(b)
	if err != nil {
		return nil, fmt.Errorf("TLS-PSK key file %s: %w", path, err)
	}
	k.Path = path
	return k, nil
}

func parse(b []byte) (*Keys, error) {
	k := &Keys{keys: map[string][]byte{}}
	for i, line := range bytes.Split(b, []byte("\n")) {
		line = bytes.TrimSuffix(line, []byte("\r"))
		if len(line) == 0 {
			continue
		}
		colon := bytes.LastIndexByte(line, ':')
		if colon < 0 {
			return nil, fmt.Errorf("line %d: not username:hexkey", i+1)
		}
		user, hx := string(line[:colon]), line[colon+1:]
		switch {
		case user == "":
			return nil, fmt.Errorf("line %d: empty username", i+1)
		case len(hx) == 0:
			return nil, fmt.Errorf("line %d: empty key for %q", i+1, user)
		case k.keys[user] != nil:
			return nil, fmt.Errorf("line %d: username %q appears twice", i+1, user)
		}
		key := make([]byte, hex.DecodedLen(len(hx)))
		if _, err := hex.Decode(key, hx); err != nil || len(hx)%2 != 0 {
			return nil, fmt.Errorf("line %d: key for %q is not an even number of hex digits", i+1, user)
		}
		k.keys[user] = key
	}
	if len(k.keys) == 0 {
		return nil, errors.New("no username:hexkey line")
	}
	return k, nil
}

// Key returns the key of a username.
func (k *Keys) Key(user string) ([]byte, bool) {
	key, ok := k.keys[user]
	return key, ok
}

// Len is the number of keys.
func (k *Keys) Len() int { return len(k.keys) }
