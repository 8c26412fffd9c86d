package nbdserver

import (
	"errors"
	"fmt"

	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
	"github.com/nbdgw/nbdgw/qcow2"
)

// The write commands. Each calls the engine and builds its reply only
// after the engine returned, so a reply always reports completed I/O;
// with NBD_CMD_FLAG_FUA the engine's image-wide Flush runs before the
// reply too. dispatch has already refused them on read-only exports and
// checked their flags.

// writeErrno maps an engine error to an NBD error: a full disk or a file
// size limit is NBD_ENOSPC, writing a read-only image NBD_EPERM, the rest
// NBD_EIO.
func writeErrno(err error) nbdproto.Errno {
	switch {
	case nbdproto.ErrnoOf(err) == nbdproto.ENOSPC: // ENOSPC, EDQUOT, EFBIG
		return nbdproto.ENOSPC
	case errors.Is(err, qcow2.ErrReadOnly):
		return nbdproto.EPERM
	}
	return nbdproto.EIO
}

// fua makes the request's effect durable when it carries NBD_CMD_FLAG_FUA.
func (s *session) fua(req *request) error {
	if req.Flags&nbdproto.CmdFlagFUA == 0 {
		return nil
	}
	return s.exp.Image.Flush()
}

// writeDone answers a write command whose engine call returned err.
func (s *session) writeDone(req *request, err error) reply {
	if err == nil {
		err = s.fua(req)
	}
	if err != nil {
		s.srv.cfg.Logf("nbd: %v of %d bytes at %d: %v", req.Type, req.Length, req.Offset, err)
		return s.errReply(req, writeErrno(err), err.Error())
	}
	return s.okReply(req)
}

// cmdWrite answers NBD_CMD_WRITE; readPayload has read the data.
func (s *session) cmdWrite(req *request) reply {
	if !s.inBounds(req.Offset, req.Length) {
		return s.errReply(req, nbdproto.ENOSPC, "write beyond the end of the export")
	}
	if uint64(len(req.payload)) != req.Length {
		return s.errReply(req, nbdproto.EINVAL, fmt.Sprintf("write payload of %d bytes for a length of %d", len(req.payload), req.Length))
	}
	_, err := s.exp.Image.WriteAt(req.payload, int64(req.Offset))
	putBuf(req.payload) // the engine keeps no reference to it
	req.payload = nil
	return s.writeDone(req, err)
}

// cmdWriteZeroes answers NBD_CMD_WRITE_ZEROES: without NO_HOLE the range
// may be deallocated; with FAST_ZERO the engine refuses (NBD_ENOTSUP)
// before changing anything when it would have to write zero bytes.
func (s *session) cmdWriteZeroes(req *request) reply {
	if !s.inBounds(req.Offset, req.Length) {
		return s.errReply(req, nbdproto.ENOSPC, "write zeroes beyond the end of the export")
	}
	var flags qcow2.ZeroFlags
	if req.Flags&nbdproto.CmdFlagNoHole == 0 {
		flags |= qcow2.ZeroMayUnmap
	}
	if req.Flags&nbdproto.CmdFlagFastZero != 0 {
		flags |= qcow2.ZeroFast
	}
	err := s.exp.Image.WriteZeroes(int64(req.Offset), int64(req.Length), flags)
	if errors.Is(err, qcow2.ErrNotFast) {
		return s.errReply(req, nbdproto.ENOTSUP, "zeroing this range is not fast")
	}
	return s.writeDone(req, err)
}

// cmdTrim answers NBD_CMD_TRIM: the engine releases the whole clusters of
// the range (which then read as zeroes) and leaves partial ones alone.
func (s *session) cmdTrim(req *request) reply {
	if !s.inBounds(req.Offset, req.Length) {
		return s.errReply(req, nbdproto.EINVAL, "trim beyond the end of the export")
	}
	return s.writeDone(req, s.exp.Image.Discard(int64(req.Offset), int64(req.Length)))
}

// cmdFlush answers NBD_CMD_FLUSH. The engine's Flush is image-wide: every
// write completed so far, on any connection, is durable when it returns.
// Offset and length are reserved; like QEMU, their values are ignored.
func (s *session) cmdFlush(req *request) reply {
	if err := s.exp.Image.Flush(); err != nil {
		s.srv.cfg.Logf("nbd: flush: %v", err)
		return s.errReply(req, writeErrno(err), err.Error())
	}
	return s.okReply(req)
}
