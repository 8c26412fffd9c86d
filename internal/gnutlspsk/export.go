//go:build cgo

package gnutlspsk

// The callback GnuTLS calls from its handshake, in a file of its own:
// a file with //export may declare C in its preamble but not define it.

/*
#include <stdint.h>
#include <gnutls/gnutls.h>
*/
import "C"

//export goPSKLookup
func goPSKLookup(h C.uintptr_t, user *C.char, n C.uint, key *C.gnutls_datum_t) C.int {
	return lookupKey(uintptr(h), C.GoStringN(user, C.int(n)), (*C.gnutls_datum_t)(key))
}
