// Package backup copies a disk image, from an NBD export or a local image,
// into a new qcow2 file: the whole guest content (a full backup), only
// what the top layer holds (a layer backup, which rebuilds one layer of a
// backing chain), or only the ranges a dirty bitmap marks (an incremental
// backup onto the previous one).
//
// A layer backup must know, for every range, whether the top layer holds
// it: base:allocation alone cannot say (a zeroed cluster hiding backing
// data reads as a hole, seeds 000 and 002), so the copy uses
// qemu:joint-allocation, or base:allocation with qemu:allocation-depth, and
// refuses a server that offers neither. Local zeroes become zero clusters,
// so that they keep hiding the backing file; ranges left to the backing
// file stay unallocated.
//
// The output is written under a temporary name in its directory and
// renamed over OUT only once complete and flushed: an interrupted or failed
// backup leaves nothing under OUT's name.
package backup

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nbdgw/nbdgw/nbdserver/nbdclient"
	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
	"github.com/nbdgw/nbdgw/qcow2"
)

// Mode is what a backup copies.
type Mode int

const (
	// Full copies the guest content of the whole chain.
	Full Mode = iota
	// Layer copies what the top layer holds, as it holds it.
	Layer
	// Incremental copies the ranges dirty in a bitmap.
	Incremental
)

// Options control Run.
type Options struct {
	Mode   Mode
	Bitmap string // Incremental: the bitmap's name
	// Backing is OUT's backing file (the base of a layer, the previous
	// backup of an incremental one); its size must be SOURCE's.
	Backing string
	// Connections is how many NBD connections read in parallel (a local
	// source: how many readers). 0 means 4.
	Connections int
	// ClusterSize and ExtendedL2 set OUT's geometry; zero values follow
	// the source (see Geometry).
	ClusterSize int64
	ExtendedL2  *bool
	// Force replaces an existing OUT.
	Force bool
	// Image opens a local SOURCE (format, locks, confinement, no-backing).
	Image qcow2.Options
	// Progress, if set, is called now and then with the bytes of the
	// virtual disk dealt with so far and the total.
	Progress func(done, total int64)
	// Note receives remarks (which metadata is used, fewer connections).
	Note func(string)
}

// Stats is what a backup did.
type Stats struct {
	Read    int64 // bytes read from SOURCE
	Written int64 // bytes written to OUT as data
	Zeroed  int64 // bytes written to OUT as zero clusters
	Skipped int64 // bytes left unallocated in OUT
	Elapsed time.Duration
	Used    string // the metadata the copy relied on
}

// String is the one-line summary nbdgw backup prints.
func (s Stats) String() string {
	return fmt.Sprintf("read %d bytes, wrote %d, zeroed %d, skipped %d in %.2f s (%s)",
		s.Read, s.Written, s.Zeroed, s.Skipped, s.Elapsed.Seconds(), s.Used)
}

// ParseCreateOptions parses -o OPTS: cluster_size=SIZE (512 B to 2 MiB, a
// power of two; k/M suffixes) and extended_l2=on|off.
func ParseCreateOptions(s string) (clusterSize int64, extL2 *bool, err error) {
	for _, kv := range strings.Split(s, ",") {
		if kv == "" {
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return 0, nil, fmt.Errorf("option %q: want KEY=VALUE", kv)
		}
		switch k {
		case "cluster_size":
			n, err := parseSize(v)
			if err != nil || n < 512 || n > 2<<20 || n&(n-1) != 0 {
				return 0, nil, fmt.Errorf("cluster_size=%s: want a power of two from 512 to 2M", v)
			}
			clusterSize = n
		case "extended_l2":
			var b bool
			switch v {
			case "on", "true", "yes":
				b = true
			case "off", "false", "no":
			default:
				return 0, nil, fmt.Errorf("extended_l2=%s: want on or off", v)
			}
			extL2 = &b
		default:
			return 0, nil, fmt.Errorf("unknown option %q (known: cluster_size, extended_l2)", k)
		}
	}
	return clusterSize, extL2, nil
}

func parseSize(v string) (int64, error) {
	mult := int64(1)
	if v != "" {
		switch v[len(v)-1] {
		case 'k', 'K':
			mult = 1 << 10
		case 'm', 'M':
			mult = 1 << 20
		}
		if mult > 1 {
			v = v[:len(v)-1]
		}
	}
	n, err := strconv.ParseInt(v, 10, 64)
	return n * mult, err
}

// maxPlan is the most segments kept between the geometry walk and the copy
// (24 bytes each); past it, the copy asks the source again.
const maxPlan = 1 << 20

// Reads are pieces of at most chunk bytes, sent to the server in batches
// of at most batchSize bytes: several requests in flight on each
// connection keep a server such as qemu-nbd busy (1 MiB pieces in 8 MiB
// batches read a 1 GiB image from qemu-nbd about 25% faster than single
// 2 MiB requests, and as fast from nbdgw serve).
const (
	chunk     = 1 << 20
	batchSize = 8 << 20
)

// window is how much block status is asked for at a time.
const window = 4 << 30

// Run backs source up into out.
func Run(ctx context.Context, src, out string, o Options) (Stats, error) {
	start := time.Now()
	if o.Note == nil {
		o.Note = func(string) {}
	}
	if o.Connections <= 0 {
		o.Connections = 4
	}
	if o.Mode == Incremental && o.Bitmap == "" {
		return Stats{}, errors.New("an incremental backup needs a bitmap name")
	}
	if o.Mode == Full && o.Backing != "" {
		return Stats{}, errors.New("--backing needs --layer or --bitmap: a full backup stands alone")
	}
	if !o.Force {
		if _, err := os.Lstat(out); err == nil {
			return Stats{}, fmt.Errorf("%s exists (use --force to replace it)", out)
		}
	}
	var s source
	var err error
	if nbdproto.IsURI(src) {
		s, err = dialNBD(ctx, src, o.Mode, o.Bitmap, o.Connections, o.Note)
	} else {
		s, err = openLocal(src, o.Image, o.Mode, o.Bitmap, o.Connections)
	}
	if err != nil {
		return Stats{}, err
	}
	defer s.close()
	defer context.AfterFunc(ctx, s.interrupt)()
	if err := notTheSame(out, src, o.Backing); err != nil {
		return Stats{}, err
	}
	c := &copier{ctx: ctx, src: s, mode: o.Mode, size: s.size(), progress: o.Progress}
	c.stats.Used = s.used()
	o.Note("using " + c.stats.Used)

	co := qcow2.CreateOptions{Size: c.size}
	if o.Backing != "" {
		if co.BackingFile, co.BackingFormat, err = backingFor(o.Backing, out, c.size); err != nil {
			return Stats{}, err
		}
		c.hasBacking = true
	}
	cs, extL2, err := c.geometry(o)
	if err != nil {
		return Stats{}, err
	}
	co.ClusterBits, co.ExtendedL2 = uint32(bitsOf(cs)), extL2
	c.cluster = cs

	tmp := filepath.Join(filepath.Dir(out), fmt.Sprintf(".%s.%d-%d.partial", filepath.Base(out), os.Getpid(), time.Now().UnixNano()))
	if err := qcow2.Create(tmp, co); err != nil {
		return Stats{}, fmt.Errorf("creating %s: %w", out, err)
	}
	ok := false
	defer func() {
		if !ok {
			os.Remove(tmp)
		}
	}()
	img, err := qcow2.Open(tmp, qcow2.Options{Format: "qcow2", Writable: true})
	if err != nil {
		return Stats{}, fmt.Errorf("opening %s: %w", out, err)
	}
	c.out = img
	if f, err := os.Open(tmp); err == nil {
		// Start writeback of what is written while the copy goes on, so
		// that the final flush does not wait for all of it.
		c.writeback = f
		defer f.Close()
	}
	err = c.run()
	if err == nil {
		err = s.unchanged(ctx)
	}
	if err == nil {
		err = img.Flush()
	}
	if cerr := img.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return c.stats, err
	}
	if !o.Force {
		if _, err := os.Lstat(out); err == nil {
			return c.stats, fmt.Errorf("%s appeared while the backup ran (use --force to replace it)", out)
		}
	}
	if err := os.Rename(tmp, out); err != nil {
		return c.stats, err
	}
	ok = true
	if d, err := os.Open(filepath.Dir(out)); err == nil {
		d.Sync()
		d.Close()
	}
	c.stats.Elapsed = time.Since(start)
	if c.progress != nil {
		c.progress(c.size, c.size)
	}
	return c.stats, nil
}

// notTheSame refuses an OUT that is the source or the backing file.
func notTheSame(out string, others ...string) error {
	fo, err := os.Stat(out)
	if err != nil {
		return nil // OUT does not exist yet
	}
	for _, p := range others {
		if nbdproto.IsURI(p) || p == "" {
			continue
		}
		if fp, err := os.Stat(p); err == nil && os.SameFile(fo, fp) {
			return fmt.Errorf("%s is %s: refusing to replace what the backup reads", out, p)
		}
	}
	return nil
}

// backingFor checks the backing file and returns how OUT's header names
// it (relative to OUT's directory) and its format.
func backingFor(backing, out string, size int64) (name, format string, err error) {
	b, err := qcow2.Open(backing, qcow2.Options{})
	if err != nil {
		return "", "", fmt.Errorf("backing file: %w", err)
	}
	defer b.Close()
	if b.Size() != size {
		return "", "", fmt.Errorf("backing file %s is %d bytes, the source %d: not the source's base", backing, b.Size(), size)
	}
	format = b.Layers()[0].Format
	absB, err := filepath.Abs(backing)
	if err != nil {
		return "", "", err
	}
	absO, err := filepath.Abs(out)
	if err != nil {
		return "", "", err
	}
	name, err = filepath.Rel(filepath.Dir(absO), absB)
	if err != nil {
		name = absB
	}
	return name, format, nil
}

func bitsOf(n int64) int {
	b := 0
	for int64(1)<<b < n {
		b++
	}
	return b
}

// kind is what the copy does with a range.
type kind uint8

const (
	kindSkip kind = iota // leave unallocated
	kindZero             // zero cluster (or unallocated where nothing is below)
	kindData             // read and write
)

type seg struct {
	off, n int64
	k      kind
}

// copier is one backup in progress.
type copier struct {
	ctx        context.Context
	src        source
	out        *qcow2.Image
	mode       Mode
	size       int64
	cluster    int64
	hasBacking bool
	progress   func(done, total int64)
	plan       []seg    // the segments, when the geometry walk kept them
	writeback  *os.File // OUT's file, for sync_file_range
	unsynced   atomic.Int64

	stats Stats
	done  atomic.Int64
	read  atomic.Int64
	wrote atomic.Int64
	zeroB atomic.Int64
	skipB atomic.Int64
}

// classify turns what the source knows into what the copy does.
func (c *copier) classify(f fact) kind {
	switch c.mode {
	case Layer:
		if !f.local {
			return kindSkip
		}
	case Incremental:
		if !f.dirty {
			return kindSkip
		}
	}
	if f.zero {
		return kindZero
	}
	return kindData
}

// walk calls fn with maximal segments of one kind, in order.
func (c *copier) walk(fn func(seg) error) error {
	if c.plan != nil {
		for _, s := range c.plan {
			if err := fn(s); err != nil {
				return err
			}
		}
		return nil
	}
	var cur seg
	have := false
	for off := int64(0); off < c.size; off += window {
		n := min(window, c.size-off)
		err := c.src.facts(c.ctx, off, n, func(o, l int64, f fact) error {
			k := c.classify(f)
			if have && cur.k == k && cur.off+cur.n == o {
				cur.n += l
				return nil
			}
			if have {
				if err := fn(cur); err != nil {
					return err
				}
			}
			cur, have = seg{o, l, k}, true
			return nil
		})
		if err != nil {
			return err
		}
		if err := c.ctx.Err(); err != nil {
			return err
		}
	}
	if have {
		return fn(cur)
	}
	return nil
}

// geometry picks OUT's cluster size and extended-L2 bit: -o wins, then a
// local qcow2 source's own, then (over NBD) the granularity of the ranges
// the copy tells apart (data, zeroes, ranges left alone): 64 KiB clusters
// when they are 64 KiB aligned, else extended L2 with that granularity as
// the subcluster size, so that OUT can hold each range as the source
// reports it.
func (c *copier) geometry(o Options) (int64, bool, error) {
	cs, extL2, known := c.src.geometry()
	if !known {
		cs, extL2 = 64<<10, false
		var bounds int64
		plan := make([]seg, 0, 1024)
		err := c.walk(func(s seg) error {
			bounds |= s.off
			if plan != nil && len(plan) < maxPlan {
				plan = append(plan, s)
			} else {
				plan = nil
			}
			return nil
		})
		if err != nil {
			return 0, false, err
		}
		c.plan = plan // the copy walks it again instead of asking the source
		if g := bounds & -bounds; bounds != 0 && g < 64<<10 {
			switch {
			case g >= 512:
				cs, extL2 = max(16<<10, 32*g), true
			default:
				cs = 512
			}
		}
	}
	if o.ClusterSize != 0 {
		cs, extL2 = o.ClusterSize, false // subclusters only when asked for too
	}
	if o.ExtendedL2 != nil {
		extL2 = *o.ExtendedL2
	}
	if extL2 && cs < 16<<10 {
		return 0, false, fmt.Errorf("extended_l2 needs cluster_size of 16K at least (have %d)", cs)
	}
	return cs, extL2, nil
}

// run copies every segment: data through the workers, zeroes and skips
// at once.
func (c *copier) run() error {
	ctx, cancel := context.WithCancelCause(c.ctx)
	defer cancel(nil)
	jobs := make(chan []seg, 16)
	var wg sync.WaitGroup
	for _, r := range c.src.readers() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, batchSize)
			for batch := range jobs {
				if ctx.Err() != nil {
					continue
				}
				if err := c.copyBatch(r, buf, batch); err != nil {
					cancel(err)
				}
			}
		}()
	}
	// Reads are no larger than the server takes (a power of two, so that
	// pieces stay aligned to OUT's clusters).
	piece := int64(chunk)
	for m := c.src.maxRead(); m > 0 && piece > m && piece > 512; {
		piece /= 2
	}
	// Data goes to the workers in batches of up to batchSize bytes, which an
	// NBD connection sends together: small scattered clusters do not
	// cost a round trip each.
	var batch []seg
	var batchBytes int64
	send := func() error {
		if len(batch) == 0 {
			return nil
		}
		select {
		case jobs <- batch:
		case <-ctx.Done():
			return context.Cause(ctx)
		}
		batch, batchBytes = nil, 0
		return nil
	}
	stopProgress := c.startProgress()
	err := c.walk(func(s seg) error {
		if err := ctx.Err(); err != nil {
			return context.Cause(ctx)
		}
		switch {
		case s.k == kindSkip || (s.k == kindZero && !c.writesZeroes()):
			c.skipB.Add(s.n)
			c.done.Add(s.n)
		case s.k == kindZero:
			if err := c.out.WriteZeroes(s.off, s.n, qcow2.ZeroMayUnmap); err != nil {
				return fmt.Errorf("writing zeroes at %d: %w", s.off, err)
			}
			c.zeroB.Add(s.n)
			c.done.Add(s.n)
		default:
			for off := s.off; off < s.off+s.n; {
				end := min(s.off+s.n, (off+piece)&^(piece-1))
				if batchBytes+end-off > batchSize || len(batch) == maxBatch {
					if err := send(); err != nil {
						return err
					}
				}
				batch = append(batch, seg{off, end - off, kindData})
				batchBytes += end - off
				off = end
			}
		}
		return nil
	})
	if err == nil {
		err = send()
	}
	close(jobs)
	wg.Wait()
	stopProgress()
	if err == nil && ctx.Err() != nil {
		err = context.Cause(ctx)
	}
	c.stats.Read, c.stats.Written = c.read.Load(), c.wrote.Load()
	c.stats.Zeroed, c.stats.Skipped = c.zeroB.Load(), c.skipB.Load()
	return err
}

// writesZeroes: zero ranges must become zero clusters when something is
// below OUT to hide, and in a layer backup (they are part of the layer).
func (c *copier) writesZeroes() bool { return c.hasBacking || c.mode == Layer }

var zeroes = make([]byte, chunk)

// maxBatch is the most reads one batch holds.
const maxBatch = 64

// batchReader is a source that can have several reads in flight at once.
type batchReader interface {
	ReadBatch([]nbdclient.ReadRequest) error
}

// copyBatch reads the batch's ranges into buf (which holds them all) and
// stores them.
func (c *copier) copyBatch(r io.ReaderAt, buf []byte, batch []seg) error {
	reqs := make([]nbdclient.ReadRequest, len(batch))
	at := int64(0)
	for i, j := range batch {
		reqs[i] = nbdclient.ReadRequest{P: buf[at : at+j.n], Off: j.off}
		at += j.n
	}
	if br, ok := r.(batchReader); ok {
		if err := br.ReadBatch(reqs); err != nil {
			return fmt.Errorf("reading the source at %d (+%d bytes): %w", batch[0].off, at, err)
		}
	} else {
		for _, q := range reqs {
			if _, err := r.ReadAt(q.P, q.Off); err != nil {
				return fmt.Errorf("reading the source at %d: %w", q.Off, err)
			}
		}
	}
	c.read.Add(at)
	for _, q := range reqs {
		if err := c.store(q.P, q.Off); err != nil {
			return err
		}
	}
	return nil
}

// store writes buf, read at off. Outside layer backups (where a data
// cluster stays data, whatever it holds), clusters that read as zero are
// not written as data.
func (c *copier) store(buf []byte, off int64) error {
	defer c.done.Add(int64(len(buf)))
	if c.mode == Layer {
		return c.writeData(buf, off)
	}
	// Split at OUT's clusters into runs of data and runs of zeroes.
	i := 0
	for i < len(buf) {
		j := i
		zero := false
		for j < len(buf) {
			end := min(len(buf), int((off+int64(j)+c.cluster)&^(c.cluster-1)-off))
			z := bytes.Equal(buf[j:end], zeroes[:end-j])
			if j == i {
				zero = z
			} else if z != zero {
				break
			}
			j = end
		}
		var err error
		switch {
		case !zero:
			err = c.writeData(buf[i:j], off+int64(i))
		case c.writesZeroes():
			if err = c.out.WriteZeroes(off+int64(i), int64(j-i), qcow2.ZeroMayUnmap); err == nil {
				c.zeroB.Add(int64(j - i))
			}
		default:
			c.skipB.Add(int64(j - i))
		}
		if err != nil {
			return fmt.Errorf("writing at %d: %w", off+int64(i), err)
		}
		i = j
	}
	return nil
}

func (c *copier) writeData(p []byte, off int64) error {
	if _, err := c.out.WriteAt(p, off); err != nil {
		return fmt.Errorf("writing at %d: %w", off, err)
	}
	c.wrote.Add(int64(len(p)))
	if c.writeback != nil && c.unsynced.Add(int64(len(p))) >= writebackEvery {
		c.unsynced.Store(0)
		// Asynchronous: queues the dirty pages for writing, waits for none.
		unix.SyncFileRange(int(c.writeback.Fd()), 0, 0, unix.SYNC_FILE_RANGE_WRITE)
	}
	return nil
}

// writebackEvery is how many bytes are written between two writeback starts.
const writebackEvery = 32 << 20

// startProgress reports progress every 200 ms until the returned stop.
func (c *copier) startProgress() func() {
	if c.progress == nil {
		return func() {}
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(200 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				c.progress(c.done.Load(), c.size)
			case <-stop:
				return
			}
		}
	}()
	return func() { close(stop); wg.Wait() }
}
