package nbdserver

import (
	"math/bits"
	"sync"
)

// Buffers for write payloads and for reads on writable exports come from
// pools by power-of-two size class (4 KiB to 32 MiB), which spares the
// allocation, the zeroing and the garbage collection of one buffer per
// request. A pooled buffer's content is stale: every user overwrites it
// entirely before reading it.
const (
	minPoolShift = 12
	maxPoolShift = 25
)

var bufPools [maxPoolShift - minPoolShift + 1]sync.Pool

// poolClass is the index of the smallest class holding n bytes, or -1.
func poolClass(n int) int {
	if n <= 0 || n > 1<<maxPoolShift {
		return -1
	}
	shift := max(bits.Len(uint(n-1)), minPoolShift)
	return shift - minPoolShift
}

// getBuf returns a buffer of n bytes with unspecified content.
func getBuf(n int) []byte {
	c := poolClass(n)
	if c < 0 {
		return make([]byte, n)
	}
	if p, ok := bufPools[c].Get().(*[]byte); ok {
		return (*p)[:n]
	}
	return make([]byte, n, 1<<(c+minPoolShift))
}

// putBuf gives a buffer from getBuf back. Nothing may use it afterwards.
func putBuf(b []byte) {
	c := poolClass(cap(b))
	if c < 0 || cap(b) != 1<<(c+minPoolShift) {
		return
	}
	b = b[:cap(b)]
	bufPools[c].Put(&b)
}
