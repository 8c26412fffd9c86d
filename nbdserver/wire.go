package nbdserver

import (
	"encoding/binary"
	"errors"
	"fmt"
)

var be = binary.BigEndian

// Decoding errors. They are wrapped with the offending values.
var (
	errBadMagic   = errors.New("nbd: bad magic")
	errShort      = errors.New("nbd: message too short")
	errTooLong    = errors.New("nbd: length exceeds limit")
	errBadReply   = errors.New("nbd: malformed reply")
	errBadOption  = errors.New("nbd: malformed option")
	errBadPayload = errors.New("nbd: malformed block status payload")
)

// Header sizes.
const (
	optHeaderLen        = 16 // magic, option, length
	optReplyHeaderLen   = 20 // magic, option, type, length
	requestLen          = 28
	extendedRequestLen  = 32
	simpleReplyLen      = 16
	structuredReplyLen  = 20
	extendedReplyLen    = 32
	blockStatusHdrLen   = 4 // context id (32-bit mode)
	blockStatusExtHdr   = 8 // context id, descriptor count
	descriptorLen       = 8
	extDescriptorLen    = 16
	errorPayloadHdrLen  = 6 // error, message length
	offsetDataHdrLen    = 8
	offsetHoleLen       = 12
	bsPayloadHdrLen     = 8 // effect length
	optionHeaderMaxName = 4096
)

// optHeader is a client option header: IHAVEOPT, option, length.
type optHeader struct {
	opt    Option
	length uint32
}

func decodeOptHeader(b []byte) (optHeader, error) {
	if len(b) < optHeaderLen {
		return optHeader{}, errShort
	}
	if m := be.Uint64(b); m != optsMagic {
		return optHeader{}, fmt.Errorf("%w: option magic %#x", errBadMagic, m)
	}
	return optHeader{opt: Option(be.Uint32(b[8:])), length: be.Uint32(b[12:])}, nil
}

func (h optHeader) append(b []byte) []byte {
	b = be.AppendUint64(b, optsMagic)
	b = be.AppendUint32(b, uint32(h.opt))
	return be.AppendUint32(b, h.length)
}

// optReply is a server option reply header.
type optReply struct {
	opt    Option
	typ    Reply
	length uint32
}

func (r optReply) append(b []byte) []byte {
	b = be.AppendUint64(b, repMagic)
	b = be.AppendUint32(b, uint32(r.opt))
	b = be.AppendUint32(b, uint32(r.typ))
	return be.AppendUint32(b, r.length)
}

func decodeOptReply(b []byte) (optReply, error) {
	if len(b) < optReplyHeaderLen {
		return optReply{}, errShort
	}
	if m := be.Uint64(b); m != repMagic {
		return optReply{}, fmt.Errorf("%w: option reply magic %#x", errBadMagic, m)
	}
	return optReply{opt: Option(be.Uint32(b[8:])), typ: Reply(be.Uint32(b[12:])), length: be.Uint32(b[16:])}, nil
}

// request is a transmission request, compact (28 bytes, 32-bit length)
// or extended (32 bytes, 64-bit length).
type request struct {
	flags  uint16
	typ    Command
	cookie uint64
	offset uint64
	length uint64

	payload []byte // block status payload, read after the header
	discard bool   // a payload was consumed that the command cannot take
	mem     int64  // bytes of the server-wide buffer budget held
}

// decodeRequest decodes a request header. b holds at least requestLen
// bytes (compact) or extendedRequestLen bytes (extended).
func decodeRequest(b []byte, extended bool) (request, error) {
	want, magic := uint32(requestMagic), requestLen
	if extended {
		want, magic = extendedRequestMagic, extendedRequestLen
	}
	if len(b) < magic {
		return request{}, errShort
	}
	if m := be.Uint32(b); m != want {
		return request{}, fmt.Errorf("%w: request magic %#x", errBadMagic, m)
	}
	r := request{
		flags:  be.Uint16(b[4:]),
		typ:    Command(be.Uint16(b[6:])),
		cookie: be.Uint64(b[8:]),
		offset: be.Uint64(b[16:]),
	}
	if extended {
		r.length = be.Uint64(b[24:])
	} else {
		r.length = uint64(be.Uint32(b[24:]))
	}
	return r, nil
}

func (r request) append(b []byte, extended bool) []byte {
	if extended {
		b = be.AppendUint32(b, extendedRequestMagic)
	} else {
		b = be.AppendUint32(b, requestMagic)
	}
	b = be.AppendUint16(b, r.flags)
	b = be.AppendUint16(b, uint16(r.typ))
	b = be.AppendUint64(b, r.cookie)
	b = be.AppendUint64(b, r.offset)
	if extended {
		return be.AppendUint64(b, r.length)
	}
	return be.AppendUint32(b, uint32(r.length))
}

// replyMode is how replies are framed on a connection.
type replyMode int

const (
	modeSimple     replyMode = iota // simple replies only
	modeStructured                  // structured replies negotiated
	modeExtended                    // extended headers negotiated
)

func (m replyMode) String() string {
	return [...]string{"simple", "structured", "extended"}[m]
}

// appendSimpleReply appends a simple reply header.
func appendSimpleReply(b []byte, errno Errno, cookie uint64) []byte {
	b = be.AppendUint32(b, simpleReplyMagic)
	b = be.AppendUint32(b, uint32(errno))
	return be.AppendUint64(b, cookie)
}

// appendChunkHeader appends a structured (or, in extended mode, an
// extended) reply chunk header for a payload of length bytes. offset is
// the request's offset, echoed in extended headers.
func appendChunkHeader(b []byte, mode replyMode, flags, typ uint16, cookie, offset, length uint64) []byte {
	if mode == modeExtended {
		b = be.AppendUint32(b, extendedReplyMagic)
	} else {
		b = be.AppendUint32(b, structuredReplyMagic)
	}
	b = be.AppendUint16(b, flags)
	b = be.AppendUint16(b, typ)
	b = be.AppendUint64(b, cookie)
	if mode == modeExtended {
		b = be.AppendUint64(b, offset)
		return be.AppendUint64(b, length)
	}
	return be.AppendUint32(b, uint32(length))
}

// replyHeader is a decoded reply header of any of the three kinds.
type replyHeader struct {
	magic  uint32
	flags  uint16
	typ    uint16
	cookie uint64
	offset uint64 // extended only
	length uint64 // structured/extended: payload length
	errno  Errno  // simple only
}

// replyHeaderLen returns the header length for a reply magic, or 0.
func replyHeaderLen(magic uint32) int {
	switch magic {
	case simpleReplyMagic:
		return simpleReplyLen
	case structuredReplyMagic:
		return structuredReplyLen
	case extendedReplyMagic:
		return extendedReplyLen
	}
	return 0
}

// decodeReplyHeader decodes a reply header; b holds replyHeaderLen(magic)
// bytes.
func decodeReplyHeader(b []byte) (replyHeader, error) {
	if len(b) < 4 {
		return replyHeader{}, errShort
	}
	h := replyHeader{magic: be.Uint32(b)}
	n := replyHeaderLen(h.magic)
	if n == 0 {
		return h, fmt.Errorf("%w: reply magic %#x", errBadMagic, h.magic)
	}
	if len(b) < n {
		return h, errShort
	}
	switch h.magic {
	case simpleReplyMagic:
		h.errno = Errno(be.Uint32(b[4:]))
		h.cookie = be.Uint64(b[8:])
	case structuredReplyMagic:
		h.flags, h.typ = be.Uint16(b[4:]), be.Uint16(b[6:])
		h.cookie = be.Uint64(b[8:])
		h.length = uint64(be.Uint32(b[16:]))
	case extendedReplyMagic:
		h.flags, h.typ = be.Uint16(b[4:]), be.Uint16(b[6:])
		h.cookie = be.Uint64(b[8:])
		h.offset = be.Uint64(b[16:])
		h.length = be.Uint64(b[24:])
	}
	return h, nil
}

// blockStatusPayload is the client payload of NBD_CMD_BLOCK_STATUS with
// NBD_CMD_FLAG_PAYLOAD_LEN: an effect length and the context ids.
type blockStatusPayload struct {
	length uint64
	ids    []uint32
}

func decodeBlockStatusPayload(b []byte) (blockStatusPayload, error) {
	if len(b) < bsPayloadHdrLen || (len(b)-bsPayloadHdrLen)%4 != 0 {
		return blockStatusPayload{}, fmt.Errorf("%w: length %d", errBadPayload, len(b))
	}
	p := blockStatusPayload{length: be.Uint64(b)}
	for i := bsPayloadHdrLen; i < len(b); i += 4 {
		p.ids = append(p.ids, be.Uint32(b[i:]))
	}
	return p, nil
}

func (p blockStatusPayload) append(b []byte) []byte {
	b = be.AppendUint64(b, p.length)
	for _, id := range p.ids {
		b = be.AppendUint32(b, id)
	}
	return b
}

// extent is one block status descriptor.
type extent struct {
	length uint64
	flags  uint64
}

// decodeBlockStatus decodes a BLOCK_STATUS or BLOCK_STATUS_EXT chunk
// payload.
func decodeBlockStatus(b []byte, ext bool) (id uint32, es []extent, err error) {
	if !ext {
		if len(b) < blockStatusHdrLen+descriptorLen || (len(b)-blockStatusHdrLen)%descriptorLen != 0 {
			return 0, nil, fmt.Errorf("%w: block status length %d", errBadReply, len(b))
		}
		id = be.Uint32(b)
		for i := blockStatusHdrLen; i < len(b); i += descriptorLen {
			es = append(es, extent{uint64(be.Uint32(b[i:])), uint64(be.Uint32(b[i+4:]))})
		}
		return id, es, nil
	}
	if len(b) < blockStatusExtHdr+extDescriptorLen || (len(b)-blockStatusExtHdr)%extDescriptorLen != 0 {
		return 0, nil, fmt.Errorf("%w: block status length %d", errBadReply, len(b))
	}
	id = be.Uint32(b)
	n := be.Uint32(b[4:])
	if n != 0 && uint64(n) != uint64(len(b)-blockStatusExtHdr)/extDescriptorLen { // 0: count by length
		return 0, nil, fmt.Errorf("%w: %d descriptors announced, %d sent", errBadReply, n, (len(b)-blockStatusExtHdr)/extDescriptorLen)
	}
	for i := blockStatusExtHdr; i < len(b); i += extDescriptorLen {
		es = append(es, extent{be.Uint64(b[i:]), be.Uint64(b[i+8:])})
	}
	return id, es, nil
}

// decodeErrorPayload decodes an NBD_REPLY_TYPE_ERROR(_OFFSET) payload.
func decodeErrorPayload(b []byte) (Errno, string, error) {
	if len(b) < errorPayloadHdrLen {
		return 0, "", fmt.Errorf("%w: error chunk of %d bytes", errBadReply, len(b))
	}
	n := int(be.Uint16(b[4:]))
	if errorPayloadHdrLen+n > len(b) {
		return 0, "", fmt.Errorf("%w: error message overruns chunk", errBadReply)
	}
	return Errno(be.Uint32(b)), string(b[errorPayloadHdrLen : errorPayloadHdrLen+n]), nil
}

// appendString appends a 32-bit length-prefixed string.
func appendString(b []byte, s string) []byte {
	b = be.AppendUint32(b, uint32(len(s)))
	return append(b, s...)
}

// cutString cuts a 32-bit length-prefixed string off b.
func cutString(b []byte, max int) (s string, rest []byte, err error) {
	if len(b) < 4 {
		return "", nil, fmt.Errorf("%w: missing string length", errBadOption)
	}
	n := be.Uint32(b)
	if uint64(n) > uint64(len(b)-4) {
		return "", nil, fmt.Errorf("%w: string of %d bytes overruns option", errBadOption, n)
	}
	if int(n) > max {
		return "", nil, fmt.Errorf("%w: string of %d bytes", errTooLong, n)
	}
	return string(b[4 : 4+n]), b[4+n:], nil
}

// metaContextRequest is the data of LIST/SET_META_CONTEXT: export name and
// queries.
type metaContextRequest struct {
	export  string
	queries []string
}

// maxQueries bounds the queries of one meta context option.
const maxQueries = 1024

func decodeMetaContextRequest(b []byte) (metaContextRequest, error) {
	var m metaContextRequest
	var err error
	if m.export, b, err = cutString(b, optionHeaderMaxName); err != nil {
		return m, err
	}
	if len(b) < 4 {
		return m, fmt.Errorf("%w: missing query count", errBadOption)
	}
	n := be.Uint32(b)
	b = b[4:]
	if n > maxQueries {
		return m, fmt.Errorf("%w: %d queries", errTooLong, n)
	}
	for i := uint32(0); i < n; i++ {
		var q string
		if q, b, err = cutString(b, optionHeaderMaxName); err != nil {
			return m, err
		}
		m.queries = append(m.queries, q)
	}
	if len(b) != 0 {
		return m, fmt.Errorf("%w: %d trailing bytes", errBadOption, len(b))
	}
	return m, nil
}

func (m metaContextRequest) append(b []byte) []byte {
	b = appendString(b, m.export)
	b = be.AppendUint32(b, uint32(len(m.queries)))
	for _, q := range m.queries {
		b = appendString(b, q)
	}
	return b
}

// infoRequest is the data of NBD_OPT_INFO/GO: export name and requested
// info types.
type infoRequest struct {
	export string
	infos  []uint16
}

func decodeInfoRequest(b []byte) (infoRequest, error) {
	var r infoRequest
	var err error
	if r.export, b, err = cutString(b, optionHeaderMaxName); err != nil {
		return r, err
	}
	if len(b) < 2 {
		return r, fmt.Errorf("%w: missing info count", errBadOption)
	}
	n := int(be.Uint16(b))
	b = b[2:]
	if len(b) != 2*n {
		return r, fmt.Errorf("%w: %d info requests in %d bytes", errBadOption, n, len(b))
	}
	for i := 0; i < n; i++ {
		r.infos = append(r.infos, be.Uint16(b[2*i:]))
	}
	return r, nil
}

func (r infoRequest) append(b []byte) []byte {
	b = appendString(b, r.export)
	b = be.AppendUint16(b, uint16(len(r.infos)))
	for _, i := range r.infos {
		b = be.AppendUint16(b, i)
	}
	return b
}
