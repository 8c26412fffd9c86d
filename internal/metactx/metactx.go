// Package metactx derives NBD metadata contexts from the engine's block
// status: base:allocation, qemu:allocation-depth, qemu:joint-allocation and
// qemu:dirty-bitmap:NAME. The NBD server, nbdgw map --context and the FUSE
// maps/ files all use it, so the three front ends cannot disagree.
//
// It also writes maps in the forms nbdinfo --map prints (text, JSON,
// --totals), coalescing adjacent extents of equal flags as nbdinfo does,
// for the CLI (images and NBD URIs) and the FUSE maps/ files: see Map.
//
// # QEMU 7.2 and 10.0
//
// The oracle is qemu-nbd 10.0 (bookworm-backports). Run side by side on
// the integration corpus (compressed, zero and discarded clusters,
// subclusters, metadata preallocation, external data files, 512-byte
// clusters, short backing files, bitmaps), qemu-nbd 7.2 and 10.0 answer
// base:allocation, qemu:allocation-depth and qemu:dirty-bitmap:NAME
// identically, so the contexts have no version-dependent rule. What 10.0
// adds is framing, not content: it grants NBD_OPT_EXTENDED_HEADERS (7.2
// refuses it) and with it 64-bit extents and block status payloads that
// select a subset of the contexts; nbdinfo 1.22 shows "extended": true and
// "can_block_status_payload": true for 10.0, false for 7.2. The extents
// are the same either way (integration.TestLibnbd118 compares them,
// filtered and not, with qemu-nbd 10.0).
package metactx

import (
	"errors"
	"fmt"
	"strings"

	"github.com/nbdgw/nbdgw/qcow2"
)

// Context names.
const (
	BaseAllocation    = "base:allocation"
	AllocationDepth   = "qemu:allocation-depth"
	JointAllocation   = "qemu:joint-allocation"
	DirtyBitmapPrefix = "qemu:dirty-bitmap:"
)

// Flag bits.
const (
	StateHole    = 1 << 0 // base:allocation, joint-allocation
	StateZero    = 1 << 1 // base:allocation, joint-allocation
	StateLocal   = 1 << 2 // joint-allocation: depth == 1
	StateBacking = 1 << 3 // joint-allocation: depth >= 2
	StateDirty   = 1 << 0 // qemu:dirty-bitmap:NAME
)

// ErrUnknownContext is returned for a context name the image does not offer.
var ErrUnknownContext = errors.New("unknown metadata context")

// Names lists every context img offers, in the order qemu-nbd lists them:
// base:allocation, qemu:allocation-depth, qemu:joint-allocation, then one
// qemu:dirty-bitmap:NAME per persistent bitmap.
func Names(img *qcow2.Image) []string {
	names := []string{BaseAllocation, AllocationDepth, JointAllocation}
	for _, b := range img.Bitmaps() {
		names = append(names, DirtyBitmapPrefix+b.Name)
	}
	return names
}

// Offered reports whether img offers the context name.
func Offered(img *qcow2.Image, name string) bool {
	for _, n := range Names(img) {
		if n == name {
			return true
		}
	}
	return false
}

// Flags projects one engine extent onto a block-status context (not a
// dirty bitmap).
func Flags(name string, e qcow2.Extent) uint32 {
	var f uint32
	switch name {
	case AllocationDepth:
		return uint32(e.Depth)
	case BaseAllocation, JointAllocation:
		if !e.Data {
			f |= StateHole
		}
		if e.Zero {
			f |= StateZero
		}
		if name == JointAllocation {
			if e.Depth == 1 {
				f |= StateLocal
			} else if e.Depth >= 2 {
				f |= StateBacking
			}
		}
	}
	return f
}

// Walk calls fn with the extents of context name over [off, off+length),
// clipped to the image, coalescing adjacent extents of equal flags. The
// walk streams: nothing is held but the extent being built. If fn returns
// an error the walk stops and Walk returns it.
func Walk(img *qcow2.Image, name string, off, length int64, fn func(off, length int64, flags uint32) error) error {
	_, err := WalkLimit(img, name, off, length, 0, fn)
	return err
}

// errBudget stops a walk that used up its budget.
var errBudget = errors.New("budget used up")

// WalkLimit is Walk with a bound on the work done: it stops after budget
// lookups in the engine (0: no bound; for bitmaps, budget runs), however
// few coalesced extents they made, and returns the offset the walk
// reached. A crafted image whose extents coalesce here (or in the engine)
// can then not make one request walk for hours; a server answers the part
// walked, as NBD allows.
func WalkLimit(img *qcow2.Image, name string, off, length int64, budget int, fn func(off, length int64, flags uint32) error) (int64, error) {
	c := coalescer{fn: fn}
	if bm, ok := strings.CutPrefix(name, DirtyBitmapPrefix); ok {
		end, n := off, 0
		err := img.BitmapStatus(bm, off, length, func(start, length int64, dirty bool) error {
			var f uint32
			if dirty {
				f = StateDirty
			}
			if err := c.add(start, length, f); err != nil {
				return err
			}
			end = start + length
			if n++; budget > 0 && n >= budget {
				return errBudget
			}
			return nil
		})
		if err != nil && err != errBudget {
			return end, err
		}
		return end, c.flush()
	}
	switch name {
	case BaseAllocation, AllocationDepth, JointAllocation:
	default:
		return off, fmt.Errorf("%w: %q", ErrUnknownContext, name)
	}
	end, err := img.BlockStatusBudget(off, length, budget, func(e qcow2.Extent) error {
		return c.add(e.Start, e.Length, Flags(name, e))
	})
	if err != nil {
		return end, err
	}
	return end, c.flush()
}

type coalescer struct {
	fn     func(off, length int64, flags uint32) error
	off, n int64
	flags  uint32
	has    bool
}

func (c *coalescer) add(off, n int64, flags uint32) error {
	if c.has && c.flags == flags && c.off+c.n == off {
		c.n += n
		return nil
	}
	if err := c.flush(); err != nil {
		return err
	}
	c.off, c.n, c.flags, c.has = off, n, flags, true
	return nil
}

func (c *coalescer) flush() error {
	if !c.has {
		return nil
	}
	c.has = false
	return c.fn(c.off, c.n, c.flags)
}
