package backup

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/nbdgw/nbdgw/internal/metactx"
	"github.com/nbdgw/nbdgw/nbdserver/nbdclient"
	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
	"github.com/nbdgw/nbdgw/qcow2"
)

// fact is what a source knows of one range: whether it reads as zero,
// whether the top layer holds it, whether a dirty bitmap marks it.
type fact struct {
	zero, local, dirty bool
}

// source is where a backup reads from: an NBD export or a local image.
type source interface {
	size() int64
	// facts calls fn, in order, for pieces covering [off, off+n).
	facts(ctx context.Context, off, n int64, fn func(off, n int64, f fact) error) error
	// readers are the io.ReaderAts the copy workers share out.
	readers() []io.ReaderAt
	// maxRead is the largest read a reader takes (0: no limit).
	maxRead() int64
	// geometry is the top layer's cluster size and extended-L2 bit when
	// the source knows them (a local qcow2).
	geometry() (clusterSize int64, extL2, known bool)
	// used names the metadata the source reads, for the summary.
	used() string
	// interrupt makes reads in progress fail (on cancellation).
	interrupt()
	// unchanged checks, once everything is read, that the source still
	// has the size the backup copied.
	unchanged(ctx context.Context) error
	close() error
}

// ext is one extent of one metadata context.
type ext struct {
	off, n int64
	flags  uint32
}

// merge walks two extent lists covering the same range and calls fn with
// the pieces where neither changes.
func merge(a, b []ext, fn func(off, n int64, fa, fb uint32) error) error {
	i, j := 0, 0
	for i < len(a) && j < len(b) {
		off := max(a[i].off, b[j].off)
		end := min(a[i].off+a[i].n, b[j].off+b[j].n)
		if end > off {
			if err := fn(off, end-off, a[i].flags, b[j].flags); err != nil {
				return err
			}
		}
		if a[i].off+a[i].n == end {
			i++
		}
		if j < len(b) && b[j].off+b[j].n == end {
			j++
		}
	}
	return nil
}

// nbdSource reads an NBD export over one or more connections.
type nbdSource struct {
	mu      sync.Mutex // guards conns against interrupt while they close
	conns   []*nbdclient.Client
	mode    Mode
	ctxs    []string // negotiated on conns[0], in the order facts reads them
	sz      int64
	usedMsg string
	uri     string
}

// dialNBD connects to uri asking for the contexts mode needs, then opens
// up to want-1 more connections for reads if the server allows
// multi-connection.
func dialNBD(ctx context.Context, uri string, mode Mode, bitmap string, want int, note func(string)) (*nbdSource, error) {
	opts := nbdclient.Options{StructuredReplies: true, ExtendedHeaders: true}
	var choices [][]string
	switch mode {
	case Full:
		choices = [][]string{{metactx.BaseAllocation}, nil}
	case Layer:
		choices = [][]string{
			{metactx.JointAllocation},
			{metactx.BaseAllocation, metactx.AllocationDepth},
		}
	case Incremental:
		choices = [][]string{{metactx.DirtyBitmapPrefix + bitmap, metactx.BaseAllocation}}
	}
	var c *nbdclient.Client
	var err error
	var got []string
	for _, names := range choices {
		o := opts
		o.MetaContexts = names
		c, err = nbdclient.Dial(ctx, uri, o)
		if err == nil {
			got = names
			break
		}
		if !errors.Is(err, nbdclient.ErrContextNotOffered) {
			return nil, err
		}
	}
	if c == nil {
		switch mode {
		case Layer:
			return nil, fmt.Errorf("%s offers neither %s nor %s with %s (qemu-nbd needs -A): cannot tell which ranges the top layer holds", uri, metactx.JointAllocation, metactx.BaseAllocation, metactx.AllocationDepth)
		case Incremental:
			return nil, fmt.Errorf("%s has no bitmap %q (no metadata context %s%s; qemu-nbd needs -B %s)", uri, bitmap, metactx.DirtyBitmapPrefix, bitmap, bitmap)
		}
		return nil, err
	}
	s := &nbdSource{conns: []*nbdclient.Client{c}, mode: mode, ctxs: got, sz: c.Size(), uri: uri}
	switch {
	case len(got) == 0:
		s.usedMsg = "no block status (server offers no base:allocation): every byte read"
	default:
		s.usedMsg = joinNames(got)
	}
	if want > 1 && c.TransmissionFlags()&nbdproto.FlagCanMultiConn == 0 {
		note(fmt.Sprintf("server does not allow multiple connections (no NBD_FLAG_CAN_MULTI_CONN): using 1 of %d", want))
		want = 1
	}
	for len(s.conns) < want {
		dctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		extra, err := nbdclient.Dial(dctx, uri, opts)
		cancel()
		if err != nil {
			note(fmt.Sprintf("connection %d of %d refused (%v): going on with %d", len(s.conns)+1, want, err, len(s.conns)))
			break
		}
		if extra.Size() != s.sz {
			extra.Close()
			s.close()
			return nil, fmt.Errorf("export size changed between connections: %d then %d bytes", s.sz, extra.Size())
		}
		s.conns = append(s.conns, extra)
	}
	return s, nil
}

func joinNames(names []string) string {
	s := ""
	for i, n := range names {
		if i > 0 {
			s += " + "
		}
		s += n
	}
	return s
}

func (s *nbdSource) size() int64 { return s.sz }

func (s *nbdSource) maxRead() int64 {
	var m int64
	for _, c := range s.conns {
		if b := c.MaxBlock(); b > 0 && (m == 0 || b < m) {
			m = b
		}
	}
	return m
}
func (s *nbdSource) used() string {
	return fmt.Sprintf("%s, %d connection(s)", s.usedMsg, len(s.conns))
}
func (s *nbdSource) geometry() (int64, bool, bool) { return 0, false, false }

func (s *nbdSource) readers() []io.ReaderAt {
	r := make([]io.ReaderAt, len(s.conns))
	for i, c := range s.conns {
		r[i] = c
	}
	return r
}

// interrupt fails every request in progress: a connection blocked on a
// server that stopped answering must not keep a cancelled backup alive.
func (s *nbdSource) interrupt() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.conns {
		c.Conn().SetDeadline(time.Unix(1, 0))
	}
}

// unchanged asks the server afresh for the export's size: NBD tells a
// client of no resize, and an OUT of the old size would pass as complete.
func (s *nbdSource) unchanged(ctx context.Context) error {
	// Everything is read: leave first, for servers that take only so
	// many clients (qemu-nbd -e N).
	// (A server may close its end first after NBD_CMD_DISC: nothing to
	// report, every read has its reply.)
	s.close()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	c, err := nbdclient.Dial(ctx, s.uri, nbdclient.Options{StructuredReplies: true})
	if err != nil {
		return fmt.Errorf("checking the export's size after the copy: %w", err)
	}
	defer c.Close()
	if c.Size() != s.sz {
		return fmt.Errorf("the export changed size during the backup: %d bytes, now %d", s.sz, c.Size())
	}
	return nil
}

func (s *nbdSource) close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	for _, c := range s.conns {
		errs = append(errs, c.Close())
	}
	s.conns = nil
	return errors.Join(errs...)
}

// extents collects one context's extents over [off, off+n).
func (s *nbdSource) extents(ctx context.Context, name string, off, n int64) ([]ext, error) {
	var es []ext
	err := s.conns[0].BlockStatus(ctx, name, off, n, func(o, l int64, flags uint32) error {
		es = append(es, ext{o, l, flags})
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("block status (%s) at %d: %w", name, off, err)
	}
	if end := off + n; len(es) == 0 || es[len(es)-1].off+es[len(es)-1].n != end {
		return nil, fmt.Errorf("block status (%s) did not cover [%d, %d)", name, off, end)
	}
	return es, nil
}

func (s *nbdSource) facts(ctx context.Context, off, n int64, fn func(off, n int64, f fact) error) error {
	if len(s.ctxs) == 0 {
		return fn(off, n, fact{})
	}
	a, err := s.extents(ctx, s.ctxs[0], off, n)
	if err != nil {
		return err
	}
	if len(s.ctxs) == 1 { // base:allocation (full) or qemu:joint-allocation (layer)
		for _, e := range a {
			f := fact{zero: e.flags&metactx.StateZero != 0, local: e.flags&metactx.StateLocal != 0}
			if err := fn(e.off, e.n, f); err != nil {
				return err
			}
		}
		return nil
	}
	b, err := s.extents(ctx, s.ctxs[1], off, n)
	if err != nil {
		return err
	}
	if s.ctxs[1] == metactx.AllocationDepth { // a: base:allocation, b: depth
		return merge(a, b, func(o, l int64, base, depth uint32) error {
			return fn(o, l, fact{zero: base&metactx.StateZero != 0, local: depth == 1})
		})
	}
	// a: the dirty bitmap, b: base:allocation
	return merge(a, b, func(o, l int64, dirty, base uint32) error {
		return fn(o, l, fact{zero: base&metactx.StateZero != 0, dirty: dirty&metactx.StateDirty != 0})
	})
}

// localSource reads a local image through the engine.
type localSource struct {
	img    *qcow2.Image
	mode   Mode
	bitmap string
	n      int
}

func openLocal(path string, opts qcow2.Options, mode Mode, bitmap string, n int) (*localSource, error) {
	opts.Writable, opts.Snapshot = false, false
	img, err := qcow2.Open(path, opts)
	if err != nil {
		return nil, err
	}
	if mode == Incremental {
		found := false
		for _, b := range img.Bitmaps() {
			found = found || b.Name == bitmap
		}
		if !found {
			img.Close()
			return nil, fmt.Errorf("%s: %w %q", path, qcow2.ErrNoBitmap, bitmap)
		}
	}
	return &localSource{img: img, mode: mode, bitmap: bitmap, n: max(1, n)}, nil
}

func (s *localSource) size() int64    { return s.img.Size() }
func (s *localSource) maxRead() int64 { return 0 }
func (s *localSource) close() error   { return s.img.Close() }
func (s *localSource) interrupt()     {} // local reads end by themselves

// unchanged: a local image is held open (and locked) throughout.
func (s *localSource) unchanged(context.Context) error { return nil }

func (s *localSource) used() string {
	switch s.mode {
	case Layer:
		return "local block status (allocation depth)"
	case Incremental:
		return "local bitmap " + s.bitmap
	}
	return "local block status"
}

func (s *localSource) geometry() (int64, bool, bool) {
	l := s.img.Layers()[0]
	if l.Format != "qcow2" {
		return 0, false, false
	}
	return l.ClusterSize, l.ExtendedL2, true
}

func (s *localSource) readers() []io.ReaderAt {
	r := make([]io.ReaderAt, s.n)
	for i := range r {
		r[i] = s.img
	}
	return r
}

func (s *localSource) facts(ctx context.Context, off, n int64, fn func(off, n int64, f fact) error) error {
	var es []ext
	const zero, local = 1, 2
	err := s.img.BlockStatus(off, n, func(e qcow2.Extent) error {
		var f uint32
		if e.Zero {
			f |= zero
		}
		if e.Depth == 1 {
			f |= local
		}
		es = append(es, ext{e.Start, e.Length, f})
		return nil
	})
	if err != nil {
		return err
	}
	toFact := func(f uint32) fact { return fact{zero: f&zero != 0, local: f&local != 0} }
	if s.mode != Incremental {
		for _, e := range es {
			if err := fn(e.off, e.n, toFact(e.flags)); err != nil {
				return err
			}
		}
		return nil
	}
	var bs []ext
	err = s.img.BitmapStatus(s.bitmap, off, n, func(start, length int64, dirty bool) error {
		var f uint32
		if dirty {
			f = 1
		}
		bs = append(bs, ext{start, length, f})
		return nil
	})
	if err != nil {
		return err
	}
	return merge(bs, es, func(o, l int64, dirty, f uint32) error {
		ff := toFact(f)
		ff.dirty = dirty != 0
		return fn(o, l, ff)
	})
}
