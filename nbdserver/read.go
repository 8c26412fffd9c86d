package nbdserver

import (
	"bytes"
	"fmt"
	"os"

	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
	"github.com/nbdgw/nbdgw/qcow2"
)

// reply is a whole reply, written by session.send: byte buffers, zero
// runs, ranges of host files sent with sendfile and ranges of the image
// read through the engine as they are sent.
type reply []replyPart

// replyPart is one of:
//   - bytes b (file == nil, n == 0 and neither zero nor image);
//   - zero: n zero bytes, written from a static buffer;
//   - file: n bytes of file at off, sent with sendfile;
//   - image: n bytes of the image at off, read through the engine in
//     pieces of streamPiece bytes under the send lock (a large read
//     through the engine holds one piece, not its whole length). With
//     chunk set (structured replies), every piece goes out as its own
//     NBD_REPLY_TYPE_OFFSET_DATA chunk, so a failed read is answered
//     with NBD_REPLY_TYPE_ERROR_OFFSET; without it the framing already
//     promised the bytes and a failed read drops the connection.
//
// pooled, if set, is a getBuf buffer the reply's bytes point into, given
// back once the reply is sent.
type replyPart struct {
	b      []byte
	file   *os.File
	off, n int64
	zero   bool
	image  bool
	chunk  *chunkInfo
	pooled []byte
}

// chunkInfo is what the pieces of a streamed structured read need for
// their chunk headers.
type chunkInfo struct {
	cookie, reqOff uint64
	last           bool // the part is the reply's last: its last piece carries DONE
}

func bytesReply(bs ...[]byte) reply {
	r := make(reply, len(bs))
	for i, b := range bs {
		r[i].b = b
	}
	return r
}

// Read buffering (see doc.go, Limits): a read whose bytes through the
// engine are at most prepareMax is read before the send lock into
// buffers counted against the connection's budget; a larger one is
// streamed from the engine in pieces of streamPiece under the send lock.
// connFloor is each connection's own part of the budget (budget.go).
const (
	prepareMax  = 256 << 10
	streamPiece = 128 << 10
	connFloor   = 256 << 10
)

// segKind is how a run of a read is produced.
type segKind int

const (
	segMem  segKind = iota // read through the engine into memory
	segZero                // reads as zeroes
	segFile                // data at a host file offset: sent with sendfile
)

// readSegment is a run of a read.
type readSegment struct {
	off, length int64
	kind        segKind
	file        *os.File // segFile
	hostOff     int64    // segFile: host offset of off
}

// minHole is the smallest zero run sent as a hole: smaller ones are not
// worth a chunk header of their own.
const minHole = 4096

// cmdRead answers NBD_CMD_READ. With structured replies, ranges the
// engine reports as reading zeroes go out as NBD_REPLY_TYPE_OFFSET_HOLE
// unless the client set NBD_CMD_FLAG_DF. On plain (non-TLS) sockets,
// plain data clusters are sent straight from the host file with
// sendfile; the rest is read through the engine before anything is sent.
func (s *session) cmdRead(req *request) reply {
	if req.Length > uint64(s.srv.cfg.MaxRequest) {
		return s.errReply(req, nbdproto.EINVAL, fmt.Sprintf("read of %d bytes exceeds the maximum %d", req.Length, s.srv.cfg.MaxRequest))
	}
	if !s.inBounds(req.Offset, req.Length) {
		return s.errReply(req, nbdproto.EINVAL, "read beyond the end of the export")
	}
	if req.Length == 0 {
		if s.mode == nbdproto.ModeSimple {
			return s.okReply(req)
		}
		return bytesReply(nbdproto.AppendChunkHeader(nil, s.mode, nbdproto.ReplyFlagDone, nbdproto.ReplyTypeNone, req.Cookie, req.Offset, 0))
	}
	holes := s.mode != nbdproto.ModeSimple && req.Flags&nbdproto.CmdFlagDF == 0
	segs := s.readSegments(int64(req.Offset), int64(req.Length), holes)
	var parts reply
	var err error
	stream := false
	if s.exp.Writable || s.exp.Image.Writable() {
		req.mem += s.mem.acquire(int64(req.Length))
		segs, parts, err = s.readSnapshot(segs, int64(req.Offset), int64(req.Length))
	} else {
		var engine int64
		for _, sg := range segs {
			if sg.kind == segMem {
				engine += sg.length
			}
		}
		if stream = engine > prepareMax; !stream {
			req.mem += s.mem.acquire(engine)
		}
		parts, err = s.readParts(segs, stream)
	}
	if err != nil {
		return s.errReply(req, nbdproto.EIO, err.Error())
	}
	if s.mode == nbdproto.ModeSimple {
		return append(bytesReply(nbdproto.AppendSimpleReply(nil, 0, req.Cookie)), parts...)
	}
	if !holes {
		h := nbdproto.AppendChunkHeader(nil, s.mode, nbdproto.ReplyFlagDone, nbdproto.ReplyTypeOffsetData, req.Cookie, req.Offset, nbdproto.OffsetDataHdrLen+req.Length)
		return append(bytesReply(be.AppendUint64(h, req.Offset)), parts...)
	}
	var tail reply // the pooled buffer's holder, sent (as nothing) last
	if len(parts) > len(segs) {
		parts, tail = parts[:len(segs)], parts[len(segs):]
	}
	out := make(reply, 0, 2*len(segs))
	for i, sg := range segs {
		var flags uint16
		last := i == len(segs)-1
		if last {
			flags = nbdproto.ReplyFlagDone
		}
		if sg.kind == segZero {
			b := nbdproto.AppendChunkHeader(nil, s.mode, flags, nbdproto.ReplyTypeOffsetHole, req.Cookie, req.Offset, nbdproto.OffsetHoleLen)
			b = be.AppendUint64(b, uint64(sg.off))
			out = append(out, replyPart{b: be.AppendUint32(b, uint32(sg.length))})
			continue
		}
		if parts[i].image {
			p := parts[i]
			p.chunk = &chunkInfo{cookie: req.Cookie, reqOff: req.Offset, last: last}
			out = append(out, p)
			continue
		}
		b := nbdproto.AppendChunkHeader(nil, s.mode, flags, nbdproto.ReplyTypeOffsetData, req.Cookie, req.Offset, uint64(nbdproto.OffsetDataHdrLen+sg.length))
		out = append(out, replyPart{b: be.AppendUint64(b, uint64(sg.off))}, parts[i])
	}
	return append(out, tail...)
}

// readParts produces the data of each segment: zeroes, file ranges, and
// engine reads, done here before anything is sent unless stream, in
// which case they are read as they are sent.
func (s *session) readParts(segs []readSegment, stream bool) (reply, error) {
	parts := make(reply, len(segs))
	for i, sg := range segs {
		switch {
		case sg.kind == segFile:
			parts[i] = replyPart{file: sg.file, off: sg.hostOff, n: sg.length}
		case sg.kind == segZero:
			parts[i] = replyPart{zero: true, n: sg.length}
		case stream:
			parts[i] = replyPart{image: true, off: sg.off, n: sg.length}
		default:
			p := getBuf(int(sg.length))
			if k, err := s.exp.Image.ReadAt(p, sg.off); k < len(p) {
				putBuf(p)
				for _, q := range parts[:i] {
					if q.pooled != nil {
						putBuf(q.pooled)
					}
				}
				return nil, fmt.Errorf("read at %d: %v", sg.off, err)
			}
			parts[i] = replyPart{b: p, pooled: p}
		}
	}
	return parts, nil
}

// readSegments splits [off, off+n) by the engine's block status into
// zero runs (sent as holes if holes, else as zero bytes), host-file runs
// (on sockets that can sendfile) and runs read through the engine. If the status fails, the
// whole range goes through the engine, which reports the error.
func (s *session) readSegments(off, n int64, holes bool) []readSegment {
	var segs []readSegment
	add := func(sg readSegment) {
		if sg.kind == segZero && holes && sg.length < minHole {
			sg.kind = segMem
		}
		if k := len(segs) - 1; k >= 0 && segs[k].kind == sg.kind &&
			(sg.kind != segFile || segs[k].file == sg.file && segs[k].hostOff+segs[k].length == sg.hostOff) {
			segs[k].length += sg.length
			return
		}
		segs = append(segs, sg)
	}
	err := s.exp.Image.BlockStatus(off, n, func(e qcow2.Extent) error {
		start, end := max(e.Start, off), min(e.Start+e.Length, off+n)
		if end <= start {
			return nil
		}
		sg := readSegment{off: start, length: end - start}
		switch {
		case e.Zero:
			sg.kind = segZero
		case s.zeroCopy && e.Data && e.HasOffset && e.File != "":
			if f := s.exp.Image.HostFile(e.File); f != nil {
				sg.kind, sg.file, sg.hostOff = segFile, f, e.Offset+(start-e.Start)
			}
		}
		add(sg)
		return nil
	})
	var covered int64
	for _, sg := range segs {
		covered += sg.length
	}
	if err != nil || covered != n {
		return []readSegment{{off: off, length: n}}
	}
	return segs
}

// readSnapshot produces the data of a read on a writable export. Writes
// may run between the block status that split the range into segs and
// the reads, so the whole range is read with one engine call, which
// holds the image's lock: the reply is the content at one instant, never
// parts of different instants. A segment the block status found zero is
// sent as a hole only if the snapshot still reads zero there; otherwise
// it is sent as data.
func (s *session) readSnapshot(segs []readSegment, off, n int64) ([]readSegment, reply, error) {
	buf := getBuf(int(n))
	if k, err := s.exp.Image.ReadAt(buf, off); int64(k) < n {
		putBuf(buf)
		return nil, nil, fmt.Errorf("read at %d: %v", off, err)
	}
	parts := make(reply, len(segs), len(segs)+1)
	for i, sg := range segs {
		b := buf[sg.off-off : sg.off-off+sg.length]
		if sg.kind == segZero && !allZero(b) {
			segs[i].kind = segMem
		}
		parts[i] = replyPart{b: b}
	}
	return segs, append(parts, replyPart{pooled: buf}), nil
}

// allZero reports whether b holds only zero bytes.
func allZero(b []byte) bool {
	for len(b) > 0 {
		k := min(len(b), len(zeroes))
		if !bytes.Equal(b[:k], zeroes[:k]) {
			return false
		}
		b = b[k:]
	}
	return true
}
