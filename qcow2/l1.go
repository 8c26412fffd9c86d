package qcow2

import (
	"encoding/binary"
	"fmt"
)

// l1Table holds an L1 table sparsely: pages of l1PageEntries entries, an
// all-zero page not stored. A crafted chain of sparse files with huge L1
// tables (32 MiB each, QEMU's limit) then costs memory in proportion to
// what is allocated, not to what the headers claim.
type l1Table struct {
	n     int64
	pages [][]uint64 // nil page: all entries zero
}

const l1PageEntries = 512 // 4 KiB of entries

// loadL1 streams the L1 table in, 1 MiB at a time.
func (q *qcow2Layer) loadL1() error {
	n := int64(q.hdr.L1Size) // bounded by ParseHeader (32 MiB, inside the file)
	t := l1Table{n: n, pages: make([][]uint64, (n+l1PageEntries-1)/l1PageEntries)}
	buf := make([]byte, min(n*8, 1<<20))
	for start := int64(0); start < n; {
		cnt := min(n-start, int64(len(buf))/8)
		if err := q.readMeta(buf[:cnt*8], int64(q.hdr.L1TableOffset)+start*8); err != nil {
			return fmt.Errorf("%s: reading L1 table: %w", q.h.name, err)
		}
		for i := int64(0); i < cnt; i++ {
			if v := binary.BigEndian.Uint64(buf[i*8:]); v != 0 {
				t.set(start+i, v)
			}
		}
		start += cnt
	}
	q.l1 = t
	return nil
}

func (t *l1Table) len() int64 { return t.n }

// get returns entry i (0 past the end).
func (t *l1Table) get(i int64) uint64 {
	if i < 0 || i >= t.n {
		return 0
	}
	p := t.pages[i/l1PageEntries]
	if p == nil {
		return 0
	}
	return p[i%l1PageEntries]
}

func (t *l1Table) set(i int64, v uint64) {
	p := t.pages[i/l1PageEntries]
	if p == nil {
		if v == 0 {
			return
		}
		p = make([]uint64, l1PageEntries)
		t.pages[i/l1PageEntries] = p
	}
	p[i%l1PageEntries] = v
}

// nextAllocated returns the first index >= i whose entry points at an L2
// table, or t.n if there is none.
func (t *l1Table) nextAllocated(i int64) int64 {
	for i < t.n {
		p := t.pages[i/l1PageEntries]
		if p == nil {
			i = (i/l1PageEntries + 1) * l1PageEntries
			continue
		}
		if p[i%l1PageEntries]&l1eOffsetMask != 0 {
			return i
		}
		i++
	}
	return t.n
}
