// Package nbdclient is a small synchronous NBD client: one request at a
// time under its mutex, the fixed newstyle handshake with TLS, structured
// replies or extended headers and metadata contexts. nbdgw map NBD-URI and
// nbdgw attach use it. It bounds option replies to 64 KiB and reply chunks
// to 64 MiB.
package nbdclient

import (
	"bufio"
	"cmp"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"sync"
	"time"

	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
)

var be = binary.BigEndian

// Options control the client handshake.
type Options struct {
	ExportName        string
	StructuredReplies bool // false for connections handed to the kernel
	ExtendedHeaders   bool // implies StructuredReplies; falls back to them if refused
	MetaContexts      []string
	TLS               *tls.Config
	// StartTLS, if set, replaces crypto/tls after NBD_OPT_STARTTLS: it
	// performs the client side of the TLS handshake on the connection
	// (TLS-PSK through GnuTLS) and returns the encrypted connection.
	StartTLS func(net.Conn) (net.Conn, error)
}

// Client limits: option replies and reply chunks larger than these are
// protocol violations.
const (
	maxOptReplyLen  = 64 << 10
	maxClientChunk  = 64 << 20
	clientReadChunk = 32 << 20
)

// ErrContextNotOffered is returned by the handshake when the server does
// not offer a metadata context the client asked for.
var ErrContextNotOffered = errors.New("nbd: server does not offer metadata context")

// Client is a synchronous NBD client: one request at a time.
type Client struct {
	mu     sync.Mutex // guards conn, r, cookie and requests on the wire
	conn   net.Conn
	r      *bufio.Reader
	cookie uint64

	size     int64
	flags    nbdproto.Flags
	mode     nbdproto.ReplyMode
	contexts map[string]uint32 // negotiated meta contexts by name
	maxBlock uint32
}

// New performs the fixed newstyle handshake (ending with NBD_OPT_GO)
// on c. On failure c is closed.
func New(ctx context.Context, c net.Conn, opts Options) (*Client, error) {
	cl := &Client{conn: c, r: bufio.NewReader(c), contexts: map[string]uint32{}}
	if d, ok := ctx.Deadline(); ok {
		c.SetDeadline(d)
	}
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
	err := cl.handshake(opts)
	if !stop() {
		err = errors.Join(err, ctx.Err())
	}
	if err != nil {
		cl.conn.Close()
		return nil, err
	}
	c.SetDeadline(time.Time{})
	return cl, nil
}

// Dial connects to an NBD URI and performs the handshake. Options in the
// URI (export name, TLS) fill the fields left zero in opts.
func Dial(ctx context.Context, uri string, opts Options) (*Client, error) {
	u, err := nbdproto.ParseURI(uri)
	if err != nil {
		return nil, err
	}
	if opts.ExportName == "" {
		opts.ExportName = u.Export
	}
	if u.TLS && opts.TLS == nil && opts.StartTLS == nil {
		if opts.TLS, err = u.TLSConfig(); err != nil {
			return nil, err
		}
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, u.Network, u.Address)
	if err != nil {
		return nil, err
	}
	return New(ctx, c, opts)
}

func (c *Client) handshake(opts Options) error {
	var hello [18]byte
	if _, err := io.ReadFull(c.r, hello[:]); err != nil {
		return fmt.Errorf("nbd: reading server greeting: %w", err)
	}
	if be.Uint64(hello[:]) != nbdproto.NBDMagic || be.Uint64(hello[8:]) != nbdproto.OptsMagic {
		return fmt.Errorf("%w: not a newstyle NBD server", nbdproto.ErrBadMagic)
	}
	sflags := be.Uint16(hello[16:])
	if sflags&nbdproto.HandshakeFixedNewstyle == 0 {
		return errors.New("nbd: server does not support fixed newstyle negotiation")
	}
	cflags := uint32(nbdproto.ClientFixedNewstyle)
	noZeroes := sflags&nbdproto.HandshakeNoZeroes != 0
	if noZeroes {
		cflags |= nbdproto.ClientNoZeroes
	}
	if _, err := c.conn.Write(be.AppendUint32(nil, cflags)); err != nil {
		return err
	}
	if opts.TLS != nil || opts.StartTLS != nil {
		if err := c.startTLS(opts); err != nil {
			return err
		}
	}
	if err := c.negotiateMode(opts); err != nil {
		return err
	}
	if len(opts.MetaContexts) > 0 {
		if c.mode == nbdproto.ModeSimple {
			return errors.New("nbd: meta contexts need structured replies")
		}
		if err := c.setMetaContexts(opts.ExportName, opts.MetaContexts); err != nil {
			return err
		}
	}
	return c.optGo(opts.ExportName, noZeroes)
}

// sendOption sends one option with data.
func (c *Client) sendOption(opt nbdproto.Option, data []byte) error {
	b := nbdproto.OptHeader{Opt: opt, Length: uint32(len(data))}.Append(nil)
	_, err := c.conn.Write(append(b, data...))
	return err
}

// readOptReply reads one option reply to opt, bounding its length.
func (c *Client) readOptReply(opt nbdproto.Option) (nbdproto.OptReply, []byte, error) {
	var hb [nbdproto.OptReplyHeaderLen]byte
	if _, err := io.ReadFull(c.r, hb[:]); err != nil {
		return nbdproto.OptReply{}, nil, fmt.Errorf("nbd: reading reply to %v: %w", opt, err)
	}
	h, err := nbdproto.DecodeOptReply(hb[:])
	if err != nil {
		return h, nil, err
	}
	if h.Opt != opt {
		return h, nil, fmt.Errorf("%w: reply to %v while waiting for %v", nbdproto.ErrBadReply, h.Opt, opt)
	}
	if h.Length > maxOptReplyLen {
		return h, nil, fmt.Errorf("%w: option reply of %d bytes", nbdproto.ErrTooLong, h.Length)
	}
	data := make([]byte, h.Length)
	if _, err := io.ReadFull(c.r, data); err != nil {
		return h, nil, err
	}
	if h.Type.IsError() {
		return h, data, &nbdproto.ServerError{Op: opt.String(), Reply: h.Type, Msg: string(data)}
	}
	return h, data, nil
}

// simpleOption sends an option without data that expects NBD_REP_ACK.
func (c *Client) simpleOption(opt nbdproto.Option) error {
	if err := c.sendOption(opt, nil); err != nil {
		return err
	}
	h, _, err := c.readOptReply(opt)
	if err != nil {
		return err
	}
	if h.Type != nbdproto.RepAck {
		return fmt.Errorf("%w: %v answered %v", nbdproto.ErrBadReply, opt, h.Type)
	}
	return nil
}

func (c *Client) startTLS(opts Options) error {
	if err := c.simpleOption(nbdproto.OptStartTLS); err != nil {
		return err
	}
	var tc net.Conn
	if opts.StartTLS != nil {
		var err error
		if tc, err = opts.StartTLS(c.conn); err != nil {
			return fmt.Errorf("nbd: %w", err)
		}
	} else {
		t := tls.Client(c.conn, opts.TLS)
		if err := t.Handshake(); err != nil {
			return fmt.Errorf("nbd: TLS handshake: %w", err)
		}
		tc = t
	}
	c.conn, c.r = tc, bufio.NewReader(tc)
	return nil
}

// negotiateMode asks for extended headers and/or structured replies.
func (c *Client) negotiateMode(opts Options) error {
	if opts.ExtendedHeaders {
		err := c.simpleOption(nbdproto.OptExtendedHeaders)
		var se *nbdproto.ServerError
		switch {
		case err == nil:
			c.mode = nbdproto.ModeExtended
			return nil
		case !errors.As(err, &se):
			return err
		}
		opts.StructuredReplies = true
	}
	if opts.StructuredReplies {
		if err := c.simpleOption(nbdproto.OptStructuredReply); err != nil {
			return err
		}
		c.mode = nbdproto.ModeStructured
	}
	return nil
}

func (c *Client) setMetaContexts(export string, names []string) error {
	data := nbdproto.MetaContextRequest{Export: export, Queries: names}.Append(nil)
	if err := c.sendOption(nbdproto.OptSetMetaContext, data); err != nil {
		return err
	}
	for {
		h, data, err := c.readOptReply(nbdproto.OptSetMetaContext)
		if err != nil {
			return err
		}
		switch h.Type {
		case nbdproto.RepAck:
			for _, n := range names {
				if _, ok := c.contexts[n]; !ok {
					// Leave politely: the caller may well retry with
					// other contexts.
					c.sendOption(nbdproto.OptAbort, nil)
					return fmt.Errorf("%w %q", ErrContextNotOffered, n)
				}
			}
			return nil
		case nbdproto.RepMetaContext:
			if len(data) < 4 {
				return fmt.Errorf("%w: short NBD_REP_META_CONTEXT", nbdproto.ErrBadReply)
			}
			c.contexts[string(data[4:])] = be.Uint32(data)
		}
	}
}

// optGo enters transmission with NBD_OPT_GO, or NBD_OPT_EXPORT_NAME when
// the server does not know NBD_OPT_GO.
func (c *Client) optGo(export string, noZeroes bool) error {
	data := nbdproto.InfoRequest{Export: export, Infos: []nbdproto.Info{nbdproto.InfoBlockSize}}.Append(nil)
	if err := c.sendOption(nbdproto.OptGo, data); err != nil {
		return err
	}
	gotExport := false
	for {
		h, data, err := c.readOptReply(nbdproto.OptGo)
		var se *nbdproto.ServerError
		if errors.As(err, &se) && se.Reply == nbdproto.RepErrUnsup {
			return c.exportName(export, noZeroes)
		}
		if err != nil {
			return err
		}
		switch h.Type {
		case nbdproto.RepAck:
			if !gotExport {
				return fmt.Errorf("%w: NBD_OPT_GO without NBD_INFO_EXPORT", nbdproto.ErrBadReply)
			}
			return nil
		case nbdproto.RepInfo:
			gotExport = c.parseInfo(data) || gotExport
		}
	}
}

// parseInfo records an NBD_REP_INFO; it reports whether it was
// NBD_INFO_EXPORT.
func (c *Client) parseInfo(b []byte) bool {
	if len(b) < 2 {
		return false
	}
	switch nbdproto.Info(be.Uint16(b)) {
	case nbdproto.InfoExport:
		if len(b) >= 12 {
			c.size, c.flags = int64(be.Uint64(b[2:])&math.MaxInt64), nbdproto.Flags(be.Uint16(b[10:]))
			return true
		}
	case nbdproto.InfoBlockSize:
		if len(b) >= 14 {
			c.maxBlock = be.Uint32(b[10:])
		}
	}
	return false
}

func (c *Client) exportName(export string, noZeroes bool) error {
	if err := c.sendOption(nbdproto.OptExportName, []byte(export)); err != nil {
		return err
	}
	n := 10
	if !noZeroes {
		n += 124
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(c.r, b); err != nil {
		return fmt.Errorf("nbd: NBD_OPT_EXPORT_NAME %q: %w", export, err)
	}
	c.size, c.flags = int64(be.Uint64(b)&math.MaxInt64), nbdproto.Flags(be.Uint16(b[8:]))
	return nil
}

// Size is the export size.
func (c *Client) Size() int64 { return c.size }

// MaxBlock is the largest request payload the server accepts
// (NBD_INFO_BLOCK_SIZE), 0 if it did not say.
func (c *Client) MaxBlock() int64 { return int64(c.maxBlock) }

// TransmissionFlags are the flags the server advertised.
func (c *Client) TransmissionFlags() nbdproto.Flags { return c.flags }

// Mode is how replies are framed, as negotiated.
func (c *Client) Mode() nbdproto.ReplyMode { return c.mode }

// Conn is the connection after the handshake.
func (c *Client) Conn() net.Conn { return c.conn }

// Close sends NBD_CMD_DISC and closes the connection.
func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.cookie++
	c.conn.Write(nbdproto.Request{Type: nbdproto.CmdDisc, Cookie: c.cookie}.Append(nil, c.mode == nbdproto.ModeExtended))
	return c.conn.Close()
}

// request sends one request and calls chunk for each reply chunk (or once
// with the simple reply's header) until the reply is done. Caller holds mu.
func (c *Client) roundTrip(req nbdproto.Request, payload []byte, chunk func(h nbdproto.ReplyHeader) error) error {
	c.cookie++
	req.Cookie = c.cookie
	ext := c.mode == nbdproto.ModeExtended
	bufs := net.Buffers{req.Append(nil, ext)}
	if len(payload) > 0 {
		bufs = append(bufs, payload)
	}
	if _, err := bufs.WriteTo(c.conn); err != nil {
		return err
	}
	var failure error
	for {
		h, err := c.readReplyHeader()
		if err != nil {
			return err
		}
		if h.Cookie != req.Cookie {
			return fmt.Errorf("%w: cookie %d, want %d", nbdproto.ErrBadReply, h.Cookie, req.Cookie)
		}
		if h.Magic != nbdproto.SimpleReplyMagic && h.Length > maxClientChunk {
			return fmt.Errorf("%w: chunk of %d bytes", nbdproto.ErrTooLong, h.Length)
		}
		if err := chunk(h); err != nil {
			var se *nbdproto.ServerError
			if !errors.As(err, &se) {
				return err // the stream is out of sync
			}
			failure = err
		}
		if h.Magic == nbdproto.SimpleReplyMagic || h.Flags&nbdproto.ReplyFlagDone != 0 {
			return failure
		}
	}
}

func (c *Client) readReplyHeader() (nbdproto.ReplyHeader, error) {
	var b [nbdproto.ExtendedReplyLen]byte
	if _, err := io.ReadFull(c.r, b[:4]); err != nil {
		return nbdproto.ReplyHeader{}, err
	}
	n := nbdproto.ReplyHeaderLen(be.Uint32(b[:]))
	if n == 0 {
		return nbdproto.ReplyHeader{}, fmt.Errorf("%w: reply magic %#x", nbdproto.ErrBadMagic, be.Uint32(b[:]))
	}
	if _, err := io.ReadFull(c.r, b[4:n]); err != nil {
		return nbdproto.ReplyHeader{}, err
	}
	return nbdproto.DecodeReplyHeader(b[:n])
}

// readPayload reads a chunk's payload (bounded by roundTrip).
func (c *Client) readPayload(h nbdproto.ReplyHeader) ([]byte, error) {
	b := make([]byte, h.Length)
	_, err := io.ReadFull(c.r, b)
	return b, err
}

// errorChunk turns an error chunk into a ServerError.
func (c *Client) errorChunk(op string, h nbdproto.ReplyHeader) error {
	b, err := c.readPayload(h)
	if err != nil {
		return err
	}
	errno, msg, err := nbdproto.DecodeErrorPayload(b)
	if err != nil {
		return err
	}
	return &nbdproto.ServerError{Op: op, Errno: errno, Msg: msg}
}

// ReadAt reads len(p) bytes at off, in requests no larger than the
// server's maximum block size.
func (c *Client) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off > c.size {
		return 0, fmt.Errorf("nbd: read at %d outside the export", off)
	}
	want := len(p)
	if int64(len(p)) > c.size-off {
		p = p[:c.size-off]
	}
	done, err := c.inChunks(len(p), func(at, n int) error {
		return c.read(p[at:at+n], off+int64(at))
	})
	if err == nil && done < want {
		err = io.EOF
	}
	return done, err
}

// inChunks calls fn for successive pieces [at, at+n) of [0, length), each
// no larger than the server's maximum block size, holding the client's
// lock; it returns how much was done before an error.
func (c *Client) inChunks(length int, fn func(at, n int) error) (int, error) {
	step := clientReadChunk
	if c.maxBlock > 0 && int(c.maxBlock) < step {
		step = int(c.maxBlock)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	done := 0
	for done < length {
		n := min(step, length-done)
		if err := fn(done, n); err != nil {
			return done, err
		}
		done += n
	}
	return done, nil
}

// read issues one NBD_CMD_READ.
func (c *Client) read(p []byte, off int64) error {
	req := nbdproto.Request{Type: nbdproto.CmdRead, Offset: uint64(off), Length: uint64(len(p))}
	var got int64
	err := c.roundTrip(req, nil, func(h nbdproto.ReplyHeader) error {
		if h.Magic == nbdproto.SimpleReplyMagic {
			if h.Errno != 0 {
				return &nbdproto.ServerError{Op: "NBD_CMD_READ", Errno: h.Errno}
			}
			got = int64(len(p))
			_, err := io.ReadFull(c.r, p)
			return err
		}
		return c.readChunk(h, p, off, &got)
	})
	if err == nil && got != int64(len(p)) {
		err = fmt.Errorf("%w: read reply covered %d of %d bytes", nbdproto.ErrBadReply, got, len(p))
	}
	return err
}

// ReadRequest is one read of a ReadBatch: len(P) bytes at Off.
type ReadRequest struct {
	P   []byte
	Off int64
}

// MaxBatch bounds the requests a ReadBatch sends before reading replies,
// so that the requests always fit in the socket's buffer (a server that
// stops reading while its replies wait cannot block us for ever).
const MaxBatch = 64

// ReadBatch sends every read of reqs before waiting for any reply, so that
// they are in flight together on the connection, then takes the replies in
// whatever order the server sends them. Each read must lie within the
// export and be no larger than the server's maximum block size (2 MiB is
// safe with every server). It returns the first error.
func (c *Client) ReadBatch(reqs []ReadRequest) error {
	if len(reqs) > MaxBatch {
		return fmt.Errorf("nbd: batch of %d reads, at most %d", len(reqs), MaxBatch)
	}
	for _, r := range reqs {
		if r.Off < 0 || r.Off > c.size || int64(len(r.P)) > c.size-r.Off || (c.maxBlock > 0 && len(r.P) > int(c.maxBlock)) {
			return fmt.Errorf("nbd: read of %d bytes at %d outside the export or too large", len(r.P), r.Off)
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	ext := c.mode == nbdproto.ModeExtended
	first := c.cookie + 1
	var b []byte
	for _, r := range reqs {
		c.cookie++
		b = nbdproto.Request{Type: nbdproto.CmdRead, Cookie: c.cookie, Offset: uint64(r.Off), Length: uint64(len(r.P))}.Append(b, ext)
	}
	if _, err := c.conn.Write(b); err != nil {
		return err
	}
	got := make([]int64, len(reqs))
	open := len(reqs)
	var failure error
	for open > 0 {
		h, err := c.readReplyHeader()
		if err != nil {
			return err
		}
		i := int(h.Cookie - first)
		if h.Cookie < first || i >= len(reqs) || got[i] < 0 {
			return fmt.Errorf("%w: reply cookie %d to none of the reads in flight", nbdproto.ErrBadReply, h.Cookie)
		}
		r := reqs[i]
		if h.Magic != nbdproto.SimpleReplyMagic && h.Length > maxClientChunk {
			return fmt.Errorf("%w: chunk of %d bytes", nbdproto.ErrTooLong, h.Length)
		}
		done := h.Magic == nbdproto.SimpleReplyMagic || h.Flags&nbdproto.ReplyFlagDone != 0
		if h.Magic == nbdproto.SimpleReplyMagic {
			if h.Errno != 0 {
				err = &nbdproto.ServerError{Op: "NBD_CMD_READ", Errno: h.Errno}
			} else if _, err = io.ReadFull(c.r, r.P); err == nil {
				got[i] = int64(len(r.P))
			}
		} else {
			err = c.readChunk(h, r.P, r.Off, &got[i])
		}
		if err != nil {
			var se *nbdproto.ServerError
			if !errors.As(err, &se) {
				return err // the stream is out of sync
			}
			failure = cmp.Or(failure, err)
		}
		if done {
			if failure == nil && got[i] != int64(len(r.P)) {
				failure = fmt.Errorf("%w: read reply covered %d of %d bytes", nbdproto.ErrBadReply, got[i], len(r.P))
			}
			got[i] = -1
			open--
		}
	}
	return failure
}

// readChunk handles one structured chunk of a read reply.
func (c *Client) readChunk(h nbdproto.ReplyHeader, p []byte, off int64, got *int64) error {
	switch h.Type {
	case nbdproto.ReplyTypeNone:
		return nil
	case nbdproto.ReplyTypeError, nbdproto.ReplyTypeErrorOffset:
		return c.errorChunk("NBD_CMD_READ", h)
	case nbdproto.ReplyTypeOffsetData:
		if h.Length < nbdproto.OffsetDataHdrLen {
			return fmt.Errorf("%w: short OFFSET_DATA", nbdproto.ErrBadReply)
		}
		var ob [8]byte
		if _, err := io.ReadFull(c.r, ob[:]); err != nil {
			return err
		}
		start, n := int64(be.Uint64(ob[:]))-off, int64(h.Length-nbdproto.OffsetDataHdrLen)
		if start < 0 || start > int64(len(p)) || n > int64(len(p))-start {
			return fmt.Errorf("%w: OFFSET_DATA outside the request", nbdproto.ErrBadReply)
		}
		*got += n
		_, err := io.ReadFull(c.r, p[start:start+n])
		return err
	case nbdproto.ReplyTypeOffsetHole:
		b, err := c.readPayload(h)
		if err != nil {
			return err
		}
		if len(b) != nbdproto.OffsetHoleLen {
			return fmt.Errorf("%w: OFFSET_HOLE of %d bytes", nbdproto.ErrBadReply, len(b))
		}
		start, n := int64(be.Uint64(b))-off, int64(be.Uint32(b[8:]))
		if start < 0 || start > int64(len(p)) || n > int64(len(p))-start {
			return fmt.Errorf("%w: OFFSET_HOLE outside the request", nbdproto.ErrBadReply)
		}
		clear(p[start : start+n])
		*got += n
		return nil
	}
	if _, err := c.readPayload(h); err != nil {
		return err
	}
	return fmt.Errorf("%w: unexpected chunk type %d to NBD_CMD_READ", nbdproto.ErrBadReply, h.Type)
}

// HasContext reports whether the meta context name was negotiated.
func (c *Client) HasContext(name string) bool {
	_, ok := c.contexts[name]
	return ok
}

// BlockStatus calls fn for the extents of the negotiated context over
// [off, off+length), clipped to the export, issuing as many requests as
// the server needs. Adjacent extents are not merged.
func (c *Client) BlockStatus(ctx context.Context, context string, off, length int64, fn func(off, length int64, flags uint32) error) error {
	id, ok := c.contexts[context]
	if !ok {
		return fmt.Errorf("nbd: metadata context %q was not negotiated", context)
	}
	end := min(off+length, c.size)
	c.mu.Lock()
	defer c.mu.Unlock()
	for off < end {
		if err := ctx.Err(); err != nil {
			return err
		}
		n, err := c.blockStatus(id, off, end-off, fn)
		if err != nil {
			return err
		}
		if n <= 0 {
			return fmt.Errorf("%w: block status made no progress at %d", nbdproto.ErrBadReply, off)
		}
		off += n
	}
	return nil
}

// blockStatus issues one NBD_CMD_BLOCK_STATUS and returns how far its
// extents reached.
func (c *Client) blockStatus(id uint32, off, length int64, fn func(off, length int64, flags uint32) error) (int64, error) {
	ext := c.mode == nbdproto.ModeExtended
	req := nbdproto.Request{Type: nbdproto.CmdBlockStatus, Offset: uint64(off), Length: uint64(length)}
	if !ext {
		req.Length = uint64(min(length, 1<<31))
	}
	var payload []byte
	if ext && len(c.contexts) > 1 && c.flags&nbdproto.FlagBlockStatusPayload != 0 {
		payload = nbdproto.BlockStatusPayload{Length: req.Length, IDs: []uint32{id}}.Append(nil)
		req.Flags |= nbdproto.CmdFlagPayloadLen
		req.Length = uint64(len(payload))
	}
	var done int64
	var userErr error // fn's error: the rest of the reply is still read
	seen := false
	err := c.roundTrip(req, payload, func(h nbdproto.ReplyHeader) error {
		if h.Magic == nbdproto.SimpleReplyMagic {
			if h.Errno != 0 {
				return &nbdproto.ServerError{Op: "NBD_CMD_BLOCK_STATUS", Errno: h.Errno}
			}
			return nil
		}
		switch h.Type {
		case nbdproto.ReplyTypeError, nbdproto.ReplyTypeErrorOffset:
			return c.errorChunk("NBD_CMD_BLOCK_STATUS", h)
		case nbdproto.ReplyTypeNone:
			return nil
		}
		b, err := c.readPayload(h)
		if err != nil {
			return err
		}
		// With extended headers the server may use either chunk type.
		if (h.Type == nbdproto.ReplyTypeBlockStatusExt && !ext) || (h.Type != nbdproto.ReplyTypeBlockStatus && h.Type != nbdproto.ReplyTypeBlockStatusExt) {
			return fmt.Errorf("%w: chunk type %d to NBD_CMD_BLOCK_STATUS", nbdproto.ErrBadReply, h.Type)
		}
		cid, es, err := nbdproto.DecodeBlockStatus(b, h.Type == nbdproto.ReplyTypeBlockStatusExt)
		if err != nil || cid != id {
			return err
		}
		if seen {
			return fmt.Errorf("%w: two block status chunks for context %d", nbdproto.ErrBadReply, id)
		}
		seen = true
		done, userErr = deliverExtents(es, off, length, fn)
		return nil
	})
	if err == nil {
		err = userErr
	}
	if err == nil && !seen {
		err = fmt.Errorf("%w: no block status chunk for context %d", nbdproto.ErrBadReply, id)
	}
	return done, err
}

// deliverExtents passes extents to fn, clipping the last to the request.
func deliverExtents(es []nbdproto.Extent, off, length int64, fn func(off, length int64, flags uint32) error) (int64, error) {
	var done int64
	for _, e := range es {
		if e.Length == 0 {
			return done, fmt.Errorf("%w: zero-length extent", nbdproto.ErrBadReply)
		}
		n := int64(min(e.Length, uint64(length-done)))
		if err := fn(off+done, n, uint32(e.Flags)); err != nil {
			return done, err
		}
		if done += n; done >= length {
			break
		}
	}
	return done, nil
}

// WriteAt writes p at off, in requests no larger than the server's
// maximum block size (io.WriterAt).
func (c *Client) WriteAt(p []byte, off int64) (int, error) {
	return c.write(p, off, 0)
}

// WriteFlags is WriteAt with command flags (CmdFlagFUA: every request is
// durable before the server answers it).
func (c *Client) WriteFlags(p []byte, off int64, flags nbdproto.CmdFlags) error {
	_, err := c.write(p, off, flags)
	return err
}

func (c *Client) write(p []byte, off int64, flags nbdproto.CmdFlags) (int, error) {
	if off < 0 || off > c.size || int64(len(p)) > c.size-off {
		return 0, fmt.Errorf("nbd: write of %d bytes at %d outside the export", len(p), off)
	}
	return c.inChunks(len(p), func(at, n int) error {
		req := nbdproto.Request{Type: nbdproto.CmdWrite, Flags: flags, Offset: uint64(off + int64(at)), Length: uint64(n)}
		return c.command(req, p[at:at+n])
	})
}

// WriteZeroes makes [off, off+length) read as zeroes. flags may hold
// CmdFlagFUA, CmdFlagNoHole (keep the range allocated) and
// CmdFlagFastZero (fail with NBD_ENOTSUP unless zeroing is cheap).
func (c *Client) WriteZeroes(off, length int64, flags nbdproto.CmdFlags) error {
	return c.rangeCommand(nbdproto.CmdWriteZeroes, off, length, flags)
}

// Trim tells the server [off, off+length) is no longer needed. flags may
// hold CmdFlagFUA.
func (c *Client) Trim(off, length int64, flags nbdproto.CmdFlags) error {
	return c.rangeCommand(nbdproto.CmdTrim, off, length, flags)
}

// Flush asks the server to make every write it has answered durable.
func (c *Client) Flush() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.command(nbdproto.Request{Type: nbdproto.CmdFlush}, nil)
}

// rangeCommand issues a command without payload over a range, split into
// 32-bit lengths unless extended headers are on.
func (c *Client) rangeCommand(typ nbdproto.Command, off, length int64, flags nbdproto.CmdFlags) error {
	if off < 0 || length < 0 {
		return fmt.Errorf("nbd: %v of %d bytes at %d", typ, length, off)
	}
	step := int64(math.MaxUint32 &^ 0xfff)
	if c.mode == nbdproto.ModeExtended {
		step = math.MaxInt64
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		n := min(step, length)
		req := nbdproto.Request{Type: typ, Flags: flags, Offset: uint64(off), Length: uint64(n)}
		if err := c.command(req, nil); err != nil {
			return err
		}
		off, length = off+n, length-n
		if length == 0 {
			return nil
		}
	}
}

// command issues one request whose reply carries no data. Caller holds mu.
func (c *Client) command(req nbdproto.Request, payload []byte) error {
	op := req.Type.String()
	return c.roundTrip(req, payload, func(h nbdproto.ReplyHeader) error {
		if h.Magic == nbdproto.SimpleReplyMagic {
			if h.Errno != 0 {
				return &nbdproto.ServerError{Op: op, Errno: h.Errno}
			}
			return nil
		}
		switch h.Type {
		case nbdproto.ReplyTypeNone:
			return nil
		case nbdproto.ReplyTypeError, nbdproto.ReplyTypeErrorOffset:
			return c.errorChunk(op, h)
		}
		if _, err := c.readPayload(h); err != nil {
			return err
		}
		return fmt.Errorf("%w: unexpected chunk type %d to %s", nbdproto.ErrBadReply, h.Type, op)
	})
}
