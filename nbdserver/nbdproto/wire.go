package nbdproto

import (
	"encoding/binary"
	"errors"
	"fmt"
)

var be = binary.BigEndian

// Decoding errors. They are wrapped with the offending values.
var (
	ErrBadMagic   = errors.New("nbd: bad magic")
	ErrShort      = errors.New("nbd: message too short")
	ErrTooLong    = errors.New("nbd: length exceeds limit")
	ErrBadReply   = errors.New("nbd: malformed reply")
	ErrBadOption  = errors.New("nbd: malformed option")
	ErrBadPayload = errors.New("nbd: malformed block status payload")
)

// Header sizes.
const (
	OptHeaderLen             = 16 // magic, option, length
	OptReplyHeaderLen        = 20 // magic, option, type, length
	RequestLen               = 28
	ExtendedRequestLen       = 32
	SimpleReplyLen           = 16
	StructuredReplyLen       = 20
	ExtendedReplyLen         = 32
	BlockStatusHdrLen        = 4 // context id (32-bit mode)
	BlockStatusExtHdrLen     = 8 // context id, descriptor count
	DescriptorLen            = 8
	ExtDescriptorLen         = 16
	ErrorPayloadHdrLen       = 6 // error, message length
	OffsetDataHdrLen         = 8
	OffsetHoleLen            = 12
	BlockStatusPayloadHdrLen = 8 // effect length
	MaxNameLen               = 4096
)

// OptHeader is a client option header: IHAVEOPT, option, length.
type OptHeader struct {
	Opt    Option
	Length uint32
}

func DecodeOptHeader(b []byte) (OptHeader, error) {
	if len(b) < OptHeaderLen {
		return OptHeader{}, ErrShort
	}
	if m := be.Uint64(b); m != OptsMagic {
		return OptHeader{}, fmt.Errorf("%w: option magic %#x", ErrBadMagic, m)
	}
	return OptHeader{Opt: Option(be.Uint32(b[8:])), Length: be.Uint32(b[12:])}, nil
}

func (h OptHeader) Append(b []byte) []byte {
	b = be.AppendUint64(b, OptsMagic)
	b = be.AppendUint32(b, uint32(h.Opt))
	return be.AppendUint32(b, h.Length)
}

// OptReply is a server option reply header.
type OptReply struct {
	Opt    Option
	Type   Reply
	Length uint32
}

func (r OptReply) Append(b []byte) []byte {
	b = be.AppendUint64(b, RepMagic)
	b = be.AppendUint32(b, uint32(r.Opt))
	b = be.AppendUint32(b, uint32(r.Type))
	return be.AppendUint32(b, r.Length)
}

func DecodeOptReply(b []byte) (OptReply, error) {
	if len(b) < OptReplyHeaderLen {
		return OptReply{}, ErrShort
	}
	if m := be.Uint64(b); m != RepMagic {
		return OptReply{}, fmt.Errorf("%w: option reply magic %#x", ErrBadMagic, m)
	}
	return OptReply{Opt: Option(be.Uint32(b[8:])), Type: Reply(be.Uint32(b[12:])), Length: be.Uint32(b[16:])}, nil
}

// Request is a transmission request header, compact (28 bytes, 32-bit
// length) or extended (32 bytes, 64-bit length).
type Request struct {
	Flags  CmdFlags
	Type   Command
	Cookie uint64
	Offset uint64
	Length uint64
}

// DecodeRequest decodes a request header. b holds at least requestLen
// bytes (compact) or extendedRequestLen bytes (extended).
func DecodeRequest(b []byte, extended bool) (Request, error) {
	want, magic := uint32(RequestMagic), RequestLen
	if extended {
		want, magic = ExtendedRequestMagic, ExtendedRequestLen
	}
	if len(b) < magic {
		return Request{}, ErrShort
	}
	if m := be.Uint32(b); m != want {
		return Request{}, fmt.Errorf("%w: request magic %#x", ErrBadMagic, m)
	}
	r := Request{
		Flags:  CmdFlags(be.Uint16(b[4:])),
		Type:   Command(be.Uint16(b[6:])),
		Cookie: be.Uint64(b[8:]),
		Offset: be.Uint64(b[16:]),
	}
	if extended {
		r.Length = be.Uint64(b[24:])
	} else {
		r.Length = uint64(be.Uint32(b[24:]))
	}
	return r, nil
}

func (r Request) Append(b []byte, extended bool) []byte {
	if extended {
		b = be.AppendUint32(b, ExtendedRequestMagic)
	} else {
		b = be.AppendUint32(b, RequestMagic)
	}
	b = be.AppendUint16(b, uint16(r.Flags))
	b = be.AppendUint16(b, uint16(r.Type))
	b = be.AppendUint64(b, r.Cookie)
	b = be.AppendUint64(b, r.Offset)
	if extended {
		return be.AppendUint64(b, r.Length)
	}
	return be.AppendUint32(b, uint32(r.Length))
}

// ReplyMode is how replies are framed on a connection.
type ReplyMode int

const (
	ModeSimple     ReplyMode = iota // simple replies only
	ModeStructured                  // structured replies negotiated
	ModeExtended                    // extended headers negotiated
)

func (m ReplyMode) String() string {
	return [...]string{"simple", "structured", "extended"}[m]
}

// AppendSimpleReply appends a simple reply header.
func AppendSimpleReply(b []byte, errno Errno, cookie uint64) []byte {
	b = be.AppendUint32(b, SimpleReplyMagic)
	b = be.AppendUint32(b, uint32(errno))
	return be.AppendUint64(b, cookie)
}

// AppendChunkHeader appends a structured (or, in extended mode, an
// extended) reply chunk header for a payload of length bytes. offset is
// the request's offset, echoed in extended headers.
func AppendChunkHeader(b []byte, mode ReplyMode, flags uint16, typ ReplyType, cookie, offset, length uint64) []byte {
	if mode == ModeExtended {
		b = be.AppendUint32(b, ExtendedReplyMagic)
	} else {
		b = be.AppendUint32(b, StructuredReplyMagic)
	}
	b = be.AppendUint16(b, flags)
	b = be.AppendUint16(b, uint16(typ))
	b = be.AppendUint64(b, cookie)
	if mode == ModeExtended {
		b = be.AppendUint64(b, offset)
		return be.AppendUint64(b, length)
	}
	return be.AppendUint32(b, uint32(length))
}

// ReplyHeader is a decoded reply header of any of the three kinds.
type ReplyHeader struct {
	Magic  uint32
	Flags  uint16
	Type   ReplyType
	Cookie uint64
	Offset uint64 // extended only
	Length uint64 // structured/extended: payload length
	Errno  Errno  // simple only
}

// ReplyHeaderLen returns the header length for a reply magic, or 0.
func ReplyHeaderLen(magic uint32) int {
	switch magic {
	case SimpleReplyMagic:
		return SimpleReplyLen
	case StructuredReplyMagic:
		return StructuredReplyLen
	case ExtendedReplyMagic:
		return ExtendedReplyLen
	}
	return 0
}

// DecodeReplyHeader decodes a reply header; b holds replyHeaderLen(magic)
// bytes.
func DecodeReplyHeader(b []byte) (ReplyHeader, error) {
	if len(b) < 4 {
		return ReplyHeader{}, ErrShort
	}
	h := ReplyHeader{Magic: be.Uint32(b)}
	n := ReplyHeaderLen(h.Magic)
	if n == 0 {
		return h, fmt.Errorf("%w: reply magic %#x", ErrBadMagic, h.Magic)
	}
	if len(b) < n {
		return h, ErrShort
	}
	switch h.Magic {
	case SimpleReplyMagic:
		h.Errno = Errno(be.Uint32(b[4:]))
		h.Cookie = be.Uint64(b[8:])
	case StructuredReplyMagic:
		h.Flags, h.Type = be.Uint16(b[4:]), ReplyType(be.Uint16(b[6:]))
		h.Cookie = be.Uint64(b[8:])
		h.Length = uint64(be.Uint32(b[16:]))
	case ExtendedReplyMagic:
		h.Flags, h.Type = be.Uint16(b[4:]), ReplyType(be.Uint16(b[6:]))
		h.Cookie = be.Uint64(b[8:])
		h.Offset = be.Uint64(b[16:])
		h.Length = be.Uint64(b[24:])
	}
	return h, nil
}

// BlockStatusPayload is the client payload of NBD_CMD_BLOCK_STATUS with
// NBD_CMD_FLAG_PAYLOAD_LEN: an effect length and the context ids.
type BlockStatusPayload struct {
	Length uint64
	IDs    []uint32
}

func DecodeBlockStatusPayload(b []byte) (BlockStatusPayload, error) {
	if len(b) < BlockStatusPayloadHdrLen || (len(b)-BlockStatusPayloadHdrLen)%4 != 0 {
		return BlockStatusPayload{}, fmt.Errorf("%w: length %d", ErrBadPayload, len(b))
	}
	p := BlockStatusPayload{Length: be.Uint64(b)}
	for i := BlockStatusPayloadHdrLen; i < len(b); i += 4 {
		p.IDs = append(p.IDs, be.Uint32(b[i:]))
	}
	return p, nil
}

func (p BlockStatusPayload) Append(b []byte) []byte {
	b = be.AppendUint64(b, p.Length)
	for _, id := range p.IDs {
		b = be.AppendUint32(b, id)
	}
	return b
}

// Extent is one block status descriptor.
type Extent struct {
	Length uint64
	Flags  uint64
}

// DecodeBlockStatus decodes a BLOCK_STATUS or BLOCK_STATUS_EXT chunk
// payload.
func DecodeBlockStatus(b []byte, ext bool) (id uint32, es []Extent, err error) {
	if !ext {
		if len(b) < BlockStatusHdrLen+DescriptorLen || (len(b)-BlockStatusHdrLen)%DescriptorLen != 0 {
			return 0, nil, fmt.Errorf("%w: block status length %d", ErrBadReply, len(b))
		}
		id = be.Uint32(b)
		for i := BlockStatusHdrLen; i < len(b); i += DescriptorLen {
			es = append(es, Extent{uint64(be.Uint32(b[i:])), uint64(be.Uint32(b[i+4:]))})
		}
		return id, es, nil
	}
	if len(b) < BlockStatusExtHdrLen+ExtDescriptorLen || (len(b)-BlockStatusExtHdrLen)%ExtDescriptorLen != 0 {
		return 0, nil, fmt.Errorf("%w: block status length %d", ErrBadReply, len(b))
	}
	id = be.Uint32(b)
	n := be.Uint32(b[4:])
	if n != 0 && uint64(n) != uint64(len(b)-BlockStatusExtHdrLen)/ExtDescriptorLen { // 0: count by length
		return 0, nil, fmt.Errorf("%w: %d descriptors announced, %d sent", ErrBadReply, n, (len(b)-BlockStatusExtHdrLen)/ExtDescriptorLen)
	}
	for i := BlockStatusExtHdrLen; i < len(b); i += ExtDescriptorLen {
		es = append(es, Extent{be.Uint64(b[i:]), be.Uint64(b[i+8:])})
	}
	return id, es, nil
}

// DecodeErrorPayload decodes an NBD_REPLY_TYPE_ERROR(_OFFSET) payload.
func DecodeErrorPayload(b []byte) (Errno, string, error) {
	if len(b) < ErrorPayloadHdrLen {
		return 0, "", fmt.Errorf("%w: error chunk of %d bytes", ErrBadReply, len(b))
	}
	n := int(be.Uint16(b[4:]))
	if ErrorPayloadHdrLen+n > len(b) {
		return 0, "", fmt.Errorf("%w: error message overruns chunk", ErrBadReply)
	}
	return Errno(be.Uint32(b)), string(b[ErrorPayloadHdrLen : ErrorPayloadHdrLen+n]), nil
}

// AppendString appends a 32-bit length-prefixed string.
func AppendString(b []byte, s string) []byte {
	b = be.AppendUint32(b, uint32(len(s)))
	return append(b, s...)
}

// CutString cuts a 32-bit length-prefixed string off b.
func CutString(b []byte, max int) (s string, rest []byte, err error) {
	if len(b) < 4 {
		return "", nil, fmt.Errorf("%w: missing string length", ErrBadOption)
	}
	n := be.Uint32(b)
	if uint64(n) > uint64(len(b)-4) {
		return "", nil, fmt.Errorf("%w: string of %d bytes overruns option", ErrBadOption, n)
	}
	if int(n) > max {
		return "", nil, fmt.Errorf("%w: string of %d bytes", ErrTooLong, n)
	}
	return string(b[4 : 4+n]), b[4+n:], nil
}

// MetaContextRequest is the data of LIST/SET_META_CONTEXT: export name and
// queries.
type MetaContextRequest struct {
	Export  string
	Queries []string
}

// MaxQueries bounds the queries of one meta context option.
const MaxQueries = 1024

func DecodeMetaContextRequest(b []byte) (MetaContextRequest, error) {
	var m MetaContextRequest
	var err error
	if m.Export, b, err = CutString(b, MaxNameLen); err != nil {
		return m, err
	}
	if len(b) < 4 {
		return m, fmt.Errorf("%w: missing query count", ErrBadOption)
	}
	n := be.Uint32(b)
	b = b[4:]
	if n > MaxQueries {
		return m, fmt.Errorf("%w: %d queries", ErrTooLong, n)
	}
	for i := uint32(0); i < n; i++ {
		var q string
		if q, b, err = CutString(b, MaxNameLen); err != nil {
			return m, err
		}
		m.Queries = append(m.Queries, q)
	}
	if len(b) != 0 {
		return m, fmt.Errorf("%w: %d trailing bytes", ErrBadOption, len(b))
	}
	return m, nil
}

func (m MetaContextRequest) Append(b []byte) []byte {
	b = AppendString(b, m.Export)
	b = be.AppendUint32(b, uint32(len(m.Queries)))
	for _, q := range m.Queries {
		b = AppendString(b, q)
	}
	return b
}

// InfoRequest is the data of NBD_OPT_INFO/GO: export name and requested
// info types.
type InfoRequest struct {
	Export string
	Infos  []Info
}

func DecodeInfoRequest(b []byte) (InfoRequest, error) {
	var r InfoRequest
	var err error
	if r.Export, b, err = CutString(b, MaxNameLen); err != nil {
		return r, err
	}
	if len(b) < 2 {
		return r, fmt.Errorf("%w: missing info count", ErrBadOption)
	}
	n := int(be.Uint16(b))
	b = b[2:]
	if len(b) != 2*n {
		return r, fmt.Errorf("%w: %d info requests in %d bytes", ErrBadOption, n, len(b))
	}
	for i := 0; i < n; i++ {
		r.Infos = append(r.Infos, Info(be.Uint16(b[2*i:])))
	}
	return r, nil
}

func (r InfoRequest) Append(b []byte) []byte {
	b = AppendString(b, r.Export)
	b = be.AppendUint16(b, uint16(len(r.Infos)))
	for _, i := range r.Infos {
		b = be.AppendUint16(b, uint16(i))
	}
	return b
}
