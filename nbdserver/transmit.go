package nbdserver

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"runtime/debug"
	"sync"
	"time"

	"github.com/nbdgw/nbdgw/internal/metactx"
	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
)

// Reply size limits.
const (
	// maxExtentBytes bounds the descriptors of one block status chunk,
	// like QEMU's 1 MiB (NBD_MAX_BLOCK_STATUS_EXTENTS * 8).
	maxExtentBytes = 1 << 20
	// statusBudget bounds the engine lookups one block status chunk may
	// cost (a few tens of milliseconds at worst).
	statusBudget = 1 << 16
)

// session is the transmission phase of one connection.
type session struct {
	srv      *Server
	conn     net.Conn
	r        *bufio.Reader
	exp      *Export
	mode     nbdproto.ReplyMode
	contexts []string       // negotiated meta contexts; the id is the index
	flags    nbdproto.Flags // transmission flags advertised
	zeroCopy bool           // data may be sent from host files with sendfile

	slots chan struct{}  // one token per request in flight
	mem   *connBudget    // this connection's share of buffer bytes
	wg    sync.WaitGroup // requests in flight

	sendMu  sync.Mutex // guards writes to conn and sendErr
	sendErr error
}

// serve reads requests until NBD_CMD_DISC, EOF or a protocol violation,
// then waits for the requests in flight.
// request is a transmission request being served.
type request struct {
	nbdproto.Request

	payload []byte // block status payload, read after the header
	discard bool   // a payload was consumed that the command cannot take
	mem     int64  // bytes of the server-wide buffer budget held
}

func (s *session) serve() error {
	defer s.wg.Wait()
	hdr := make([]byte, nbdproto.RequestLen)
	if s.mode == nbdproto.ModeExtended {
		hdr = make([]byte, nbdproto.ExtendedRequestLen)
	}
	for {
		if _, err := io.ReadFull(s.r, hdr); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
				return nil
			}
			return err
		}
		h, err := nbdproto.DecodeRequest(hdr, s.mode == nbdproto.ModeExtended)
		if err != nil {
			return err
		}
		req := request{Request: h}
		if req.Type == nbdproto.CmdDisc {
			return nil
		}
		// The slot is taken before a write's payload is read, so at most
		// MaxInFlight payloads of at most MaxRequest bytes are held per
		// connection.
		s.slots <- struct{}{}
		// A write's payload counts against the connection's share and
		// the shared pool (see budget.go) before it is read, so a client
		// that stalls only throttles itself. Reads and block status take
		// their buffers' budget in the handler, once they know what they
		// hold (sendfile and zero runs hold none).
		if req.Type == nbdproto.CmdWrite && s.exp.Writable {
			req.mem = s.mem.acquire(int64(min(req.Length, uint64(s.srv.cfg.MaxRequest))))
		}
		if err := s.readPayload(&req); err != nil {
			s.release(&req)
			return err
		}
		s.wg.Add(1)
		go s.handle(req)
	}
}

// readPayload consumes the payload that follows a request header: the
// data of a write (kept for writable exports, thrown away otherwise) or,
// in extended mode, a payload announced by NBD_CMD_FLAG_PAYLOAD_LEN. Only
// lengths within the limits are read; anything larger drops the
// connection.
func (s *session) readPayload(req *request) error {
	hasPayload := req.Type == nbdproto.CmdWrite ||
		(s.mode == nbdproto.ModeExtended && req.Flags&nbdproto.CmdFlagPayloadLen != 0)
	if !hasPayload {
		return nil
	}
	limit := uint64(s.srv.cfg.MaxRequest)
	if req.Length > limit {
		return fmt.Errorf("%v: payload of %d bytes exceeds %d", req.Type, req.Length, limit)
	}
	if req.Type == nbdproto.CmdWrite && s.exp.Writable {
		req.payload = getBuf(int(req.Length))
		_, err := io.ReadFull(s.r, req.payload)
		return err
	}
	// A block status payload is an effect length and at most one id per
	// negotiated context, like QEMU; anything else is thrown away and
	// answered NBD_EINVAL.
	if req.Type != nbdproto.CmdBlockStatus || req.Length > nbdproto.BlockStatusPayloadHdrLen+4*uint64(len(s.contexts)) {
		req.discard = true
		_, err := io.CopyN(io.Discard, s.r, int64(req.Length))
		return err
	}
	req.payload = make([]byte, req.Length)
	_, err := io.ReadFull(s.r, req.payload)
	return err
}

// release gives back a request's slot and buffer budget.
func (s *session) release(req *request) {
	s.mem.release(req.mem)
	req.mem = 0
	<-s.slots
}

// handle answers one request on its own goroutine.
func (s *session) handle(req request) {
	defer func() { s.release(&req); s.wg.Done() }()
	r := s.safeDispatch(&req)
	s.send(r)
	for _, p := range r {
		if p.pooled != nil {
			putBuf(p.pooled)
		}
	}
}

// safeDispatch is dispatch with a panic recovered, logged and answered
// with NBD_EIO. Nothing of the reply has been sent at that point.
func (s *session) safeDispatch(req *request) (r reply) {
	defer func() {
		if p := recover(); p != nil {
			s.srv.cfg.Logf("nbd: panic serving %v: %v\n%s", req.Type, p, debug.Stack())
			r = s.errReply(req, nbdproto.EIO, "internal server error")
		}
	}()
	return s.dispatch(req)
}

// dispatch validates the request flags common to all commands and calls
// the command's handler. The reply it returns is complete.
func (s *session) dispatch(req *request) reply {
	allowed := nbdproto.CmdFlags(0)
	switch req.Type {
	case nbdproto.CmdRead:
		if s.mode >= nbdproto.ModeStructured {
			allowed = nbdproto.CmdFlagDF
		}
	case nbdproto.CmdBlockStatus:
		allowed = nbdproto.CmdFlagReqOne
		if s.mode == nbdproto.ModeExtended {
			allowed |= nbdproto.CmdFlagPayloadLen
		}
	case nbdproto.CmdWrite, nbdproto.CmdWriteZeroes, nbdproto.CmdTrim:
		if !s.exp.Writable {
			return s.errReply(req, nbdproto.EPERM, "export is read-only")
		}
		allowed = nbdproto.CmdFlagFUA
		switch {
		case req.Type == nbdproto.CmdWriteZeroes:
			allowed |= nbdproto.CmdFlagNoHole | nbdproto.CmdFlagFastZero
		case req.Type == nbdproto.CmdWrite && s.mode == nbdproto.ModeExtended:
			allowed |= nbdproto.CmdFlagPayloadLen
		}
	}
	if req.discard {
		return s.errReply(req, nbdproto.EINVAL, fmt.Sprintf("unexpected payload of %d bytes for %v", req.Length, req.Type))
	}
	if req.Flags&^allowed != 0 {
		return s.errReply(req, nbdproto.EINVAL, fmt.Sprintf("invalid flags %#x for %v", uint16(req.Flags), req.Type))
	}
	switch req.Type {
	case nbdproto.CmdRead:
		return s.cmdRead(req)
	case nbdproto.CmdFlush:
		return s.cmdFlush(req)
	case nbdproto.CmdWrite:
		return s.cmdWrite(req)
	case nbdproto.CmdWriteZeroes:
		return s.cmdWriteZeroes(req)
	case nbdproto.CmdTrim:
		return s.cmdTrim(req)
	case nbdproto.CmdCache:
		return s.cmdCache(req)
	case nbdproto.CmdBlockStatus:
		return s.cmdBlockStatus(req)
	}
	return s.errReply(req, nbdproto.EINVAL, "unsupported command "+req.Type.String())
}

// inBounds checks [off, off+length) against the export size.
func (s *session) inBounds(off, length uint64) bool {
	size := uint64(s.exp.Image.Size())
	return off <= size && length <= size-off
}

// cmdCache answers NBD_CMD_CACHE: nothing to prefetch that the host page
// cache would not, so it only validates the range.
func (s *session) cmdCache(req *request) reply {
	if !s.inBounds(req.Offset, req.Length) {
		return s.errReply(req, nbdproto.EINVAL, "cache request beyond the end of the export")
	}
	return s.okReply(req)
}

// send writes a whole reply under the send lock: byte parts gathered
// into one writev, zero runs from a static buffer, file parts with
// sendfile, image parts read through the engine piece by piece. After a
// write error the connection is closed, which ends the request loop.
func (s *session) send(r reply) {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	if s.sendErr != nil {
		return
	}
	// A client that does not read its replies loses the connection
	// rather than holding buffers (and the server-wide budget) forever.
	s.conn.SetWriteDeadline(time.Now().Add(s.srv.cfg.SendTimeout))
	var bufs net.Buffers
	flush := func() error {
		_, err := bufs.WriteTo(s.conn)
		bufs = nil
		return err
	}
	for _, p := range r {
		if p.file == nil && !p.zero && !p.image {
			bufs = append(bufs, p.b)
			continue
		}
		if err := flush(); err != nil {
			s.fail(err)
			return
		}
		var err error
		switch {
		case p.file != nil:
			err = sendFileRange(s.conn, p.file, p.off, p.n)
		case p.zero:
			err = writeZeroes(s.conn, p.n)
		default:
			var done bool
			done, err = s.sendImage(p)
			if done && err == nil {
				return // an error chunk ended the reply
			}
		}
		if err != nil {
			s.fail(err)
			return
		}
	}
	if err := flush(); err != nil {
		s.fail(err)
	}
}

// sendImage sends an image part, reading it through the engine one
// piece at a time into one pooled buffer. With p.chunk, each piece is an
// OFFSET_DATA chunk and a failed read is answered with an ERROR_OFFSET
// chunk that ends the reply (done true); without, a failed read is
// returned and drops the connection.
func (s *session) sendImage(p replyPart) (done bool, err error) {
	buf := getBuf(int(min(p.n, streamPiece)))
	defer putBuf(buf)
	for pos := int64(0); pos < p.n; {
		k := min(p.n-pos, int64(len(buf)))
		b := buf[:k]
		off := p.off + pos
		if got, rerr := s.exp.Image.ReadAt(b, off); int64(got) < k {
			if p.chunk == nil {
				s.srv.cfg.Logf("nbd: %v: read at %d failed after the reply header was sent, dropping the connection: %v", s.conn.RemoteAddr(), off, rerr)
				return false, fmt.Errorf("read at %d: %v", off, rerr)
			}
			msg := fmt.Sprintf("read at %d: %v", off, rerr)
			if len(msg) > 4096 {
				msg = msg[:4096]
			}
			h := nbdproto.AppendChunkHeader(nil, s.mode, nbdproto.ReplyFlagDone, nbdproto.ReplyTypeErrorOffset, p.chunk.cookie, p.chunk.reqOff, uint64(nbdproto.ErrorPayloadHdrLen+len(msg)+8))
			h = be.AppendUint32(h, uint32(nbdproto.EIO))
			h = be.AppendUint16(h, uint16(len(msg)))
			h = append(h, msg...)
			h = be.AppendUint64(h, uint64(off))
			_, err := s.conn.Write(h)
			return true, err
		}
		pos += k
		bufs := net.Buffers{b}
		if p.chunk != nil {
			var flags uint16
			if p.chunk.last && pos == p.n {
				flags = nbdproto.ReplyFlagDone
			}
			h := nbdproto.AppendChunkHeader(nil, s.mode, flags, nbdproto.ReplyTypeOffsetData, p.chunk.cookie, p.chunk.reqOff, uint64(nbdproto.OffsetDataHdrLen+k))
			bufs = net.Buffers{be.AppendUint64(h, uint64(off)), b}
		}
		if _, err := bufs.WriteTo(s.conn); err != nil {
			return false, err
		}
	}
	return false, nil
}

// fail records a send error and drops the connection: a reply may have
// gone out in part. Caller holds sendMu.
// fail records that replies can no longer be sent. Only the sending side
// is shut: the requests the client already sent (writes before its
// NBD_CMD_DISC, say, from a client that closed without reading replies,
// as the kernel does at disconnect) are still read and carried out, as the
// spec requires for outstanding requests; their replies are dropped.
func (s *session) fail(err error) {
	s.sendErr = err
	if cw, ok := s.conn.(interface{ CloseWrite() error }); ok && cw.CloseWrite() == nil {
		return
	}
	s.conn.Close()
}

// okReply is a success without payload.
func (s *session) okReply(req *request) reply {
	if s.mode == nbdproto.ModeExtended {
		return bytesReply(nbdproto.AppendChunkHeader(nil, s.mode, nbdproto.ReplyFlagDone, nbdproto.ReplyTypeNone, req.Cookie, req.Offset, 0))
	}
	return bytesReply(nbdproto.AppendSimpleReply(nil, 0, req.Cookie))
}

// errReply is an error reply: a simple reply without structured replies,
// else an NBD_REPLY_TYPE_ERROR chunk carrying msg.
func (s *session) errReply(req *request, errno nbdproto.Errno, msg string) reply {
	if s.mode == nbdproto.ModeSimple {
		return bytesReply(nbdproto.AppendSimpleReply(nil, errno, req.Cookie))
	}
	if len(msg) > 4096 {
		msg = msg[:4096]
	}
	b := nbdproto.AppendChunkHeader(nil, s.mode, nbdproto.ReplyFlagDone, nbdproto.ReplyTypeError, req.Cookie, req.Offset, uint64(nbdproto.ErrorPayloadHdrLen+len(msg)))
	b = be.AppendUint32(b, uint32(errno))
	b = be.AppendUint16(b, uint16(len(msg)))
	return bytesReply(append(b, msg...))
}

// errStop ends a metadata walk once a chunk is full.
var errStop = errors.New("stop")

// cmdBlockStatus answers NBD_CMD_BLOCK_STATUS with one chunk per
// selected context, each with at least one extent.
func (s *session) cmdBlockStatus(req *request) reply {
	if len(s.contexts) == 0 {
		return s.errReply(req, nbdproto.EINVAL, "no metadata context negotiated")
	}
	ids, length, err := s.statusSelection(req)
	if err != nil {
		return s.errReply(req, nbdproto.EINVAL, err.Error())
	}
	if length == 0 || !s.inBounds(req.Offset, length) {
		return s.errReply(req, nbdproto.EINVAL, "block status range empty or beyond the end of the export")
	}
	// Each chunk holds up to maxExtentBytes of descriptors until sent.
	req.mem += s.mem.acquire(int64(len(ids)) * maxExtentBytes)
	out := make(reply, 0, len(ids))
	for i, id := range ids {
		var flags uint16
		if i == len(ids)-1 {
			flags = nbdproto.ReplyFlagDone
		}
		chunk, err := s.statusChunk(req, id, length, flags)
		if err != nil {
			return s.errReply(req, nbdproto.EIO, err.Error())
		}
		out = append(out, replyPart{b: chunk})
	}
	return out
}

// statusSelection returns the contexts to answer and the effect length:
// every negotiated context and the request length, or those the block
// status payload names and its effect length.
func (s *session) statusSelection(req *request) ([]uint32, uint64, error) {
	if req.Flags&nbdproto.CmdFlagPayloadLen == 0 {
		ids := make([]uint32, len(s.contexts))
		for i := range ids {
			ids[i] = uint32(i)
		}
		return ids, req.Length, nil
	}
	p, err := nbdproto.DecodeBlockStatusPayload(req.payload)
	if err != nil {
		return nil, 0, err
	}
	if len(p.IDs) == 0 {
		return nil, 0, errors.New("block status payload names no context")
	}
	var ids []uint32
	seen := map[uint32]bool{}
	for _, id := range p.IDs {
		if int64(id) >= int64(len(s.contexts)) {
			return nil, 0, fmt.Errorf("metadata context id %d was not negotiated", id)
		}
		if seen[id] {
			return nil, 0, fmt.Errorf("metadata context id %d named twice", id)
		}
		seen[id] = true
		ids = append(ids, id)
	}
	return ids, p.Length, nil
}

// statusChunk builds the BLOCK_STATUS (32-bit) or BLOCK_STATUS_EXT
// (extended headers) chunk of context id over [req.offset, +length),
// stopping after one extent with NBD_CMD_FLAG_REQ_ONE or when the
// descriptors reach maxExtentBytes.
func (s *session) statusChunk(req *request, id uint32, length uint64, flags uint16) ([]byte, error) {
	ext := s.mode == nbdproto.ModeExtended
	hdr, desc, typ := nbdproto.BlockStatusHdrLen, nbdproto.DescriptorLen, nbdproto.ReplyTypeBlockStatus
	maxLen := uint64(math.MaxUint32)
	if ext {
		hdr, desc, typ = nbdproto.BlockStatusExtHdrLen, nbdproto.ExtDescriptorLen, nbdproto.ReplyTypeBlockStatusExt
		maxLen = math.MaxInt64
	}
	limit := maxExtentBytes / desc
	if req.Flags&nbdproto.CmdFlagReqOne != 0 {
		limit = 1
	}
	var body []byte
	count := 0
	// The walk is bounded in work, not only in extents: a crafted image
	// can make millions of lookups coalesce into one extent. What was
	// walked is answered; the client asks again from there.
	_, err := metactx.WalkLimit(s.exp.Image, s.contexts[id], int64(req.Offset), int64(length), statusBudget, func(off, n int64, f uint32) error {
		if uint64(n) > maxLen {
			n = int64(maxLen &^ 0xfff)
			count = limit - 1 // a clipped extent ends the chunk
		}
		if ext {
			body = be.AppendUint64(body, uint64(n))
			body = be.AppendUint64(body, uint64(f))
		} else {
			body = be.AppendUint32(body, uint32(n))
			body = be.AppendUint32(body, f)
		}
		if count++; count >= limit {
			return errStop
		}
		return nil
	})
	if err != nil && !errors.Is(err, errStop) {
		return nil, fmt.Errorf("block status of %s: %w", s.contexts[id], err)
	}
	if len(body) == 0 {
		return nil, fmt.Errorf("block status of %s: no extents", s.contexts[id])
	}
	b := nbdproto.AppendChunkHeader(make([]byte, 0, nbdproto.ExtendedReplyLen+hdr+len(body)), s.mode, flags, typ, req.Cookie, req.Offset, uint64(hdr+len(body)))
	b = be.AppendUint32(b, id)
	if ext {
		b = be.AppendUint32(b, uint32(len(body)/desc))
	}
	return append(b, body...), nil
}
