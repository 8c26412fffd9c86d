package nbdserver

import "testing"

func TestBufPool(t *testing.T) {
	for _, tc := range []struct{ n, class int }{
		{0, -1}, {1, 0}, {4096, 0}, {4097, 1}, {1 << 20, 8}, {1<<20 + 1, 9}, {32 << 20, 13}, {32<<20 + 1, -1},
	} {
		if got := poolClass(tc.n); got != tc.class {
			t.Errorf("poolClass(%d) = %d, want %d", tc.n, got, tc.class)
		}
		if tc.n == 0 {
			continue
		}
		b := getBuf(tc.n)
		if len(b) != tc.n || (tc.class >= 0 && cap(b) != 1<<(tc.class+minPoolShift)) {
			t.Errorf("getBuf(%d): len %d cap %d", tc.n, len(b), cap(b))
		}
		putBuf(b)
	}
	putBuf(make([]byte, 5000)) // not from the pool: ignored
	if b := getBuf(5000); cap(b) != 8192 {
		t.Errorf("getBuf(5000) after putting a foreign buffer: cap %d", cap(b))
	}
}
