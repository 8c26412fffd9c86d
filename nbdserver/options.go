package nbdserver

import (
	"bufio"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"github.com/nbdgw/nbdgw/metactx"
)

// Option data limits. NBD names and queries are at most 4 KiB
// (NBD_MAX_STRING_SIZE); meta context options carry several of them.
const (
	maxOptionLen     = 64 << 10 // larger options get NBD_REP_ERR_TOO_BIG
	maxOptionDiscard = 1 << 20  // larger ones drop the connection
)

// errAborted ends the handshake without a complaint worth logging.
var errAborted = errors.New("nbd: client aborted the handshake")

// negotiation is the option haggling state of one connection.
type negotiation struct {
	srv  *Server
	conn net.Conn // replaced by the TLS connection after STARTTLS
	r    *bufio.Reader

	noZeroes bool
	tls      bool
	mode     ReplyMode
	contexts []string // negotiated meta contexts; the id is the index
	ctxFor   *Export  // export the contexts were negotiated for

	opt  Option // option being answered
	data []byte // its data
}

// run performs the handshake and returns the transmission session.
func (n *negotiation) run() (*session, error) {
	n.conn.SetDeadline(time.Now().Add(n.srv.cfg.HandshakeTimeout))
	n.r = bufio.NewReaderSize(n.conn, 4096)
	hello := be.AppendUint64(nil, NBDMagic)
	hello = be.AppendUint64(hello, OptsMagic)
	hello = be.AppendUint16(hello, HandshakeFixedNewstyle|HandshakeNoZeroes)
	if _, err := n.conn.Write(hello); err != nil {
		return nil, err
	}
	var cf [4]byte
	if _, err := io.ReadFull(n.r, cf[:]); err != nil {
		return nil, err
	}
	flags := be.Uint32(cf[:])
	if flags&^(ClientFixedNewstyle|ClientNoZeroes) != 0 {
		return nil, fmt.Errorf("unknown client flags %#x", flags)
	}
	n.noZeroes = flags&ClientNoZeroes != 0
	for {
		sess, err := n.option()
		if err != nil || sess != nil {
			if sess != nil {
				n.conn.SetDeadline(time.Time{})
			}
			return sess, err
		}
	}
}

// option reads and answers one option. It returns a session when the
// option entered the transmission phase.
func (n *negotiation) option() (*session, error) {
	var hb [OptHeaderLen]byte
	if _, err := io.ReadFull(n.r, hb[:]); err != nil {
		return nil, err
	}
	h, err := DecodeOptHeader(hb[:])
	if err != nil {
		return nil, err
	}
	n.opt, n.data = h.Opt, nil
	if h.Length > maxOptionLen {
		if h.Length > maxOptionDiscard || h.Opt == OptExportName {
			return nil, fmt.Errorf("%v: %d bytes of option data", h.Opt, h.Length)
		}
		if _, err := io.CopyN(io.Discard, n.r, int64(h.Length)); err != nil {
			return nil, err
		}
		return nil, n.replyErr(RepErrTooBig, "option data too long")
	}
	n.data = make([]byte, h.Length)
	if _, err := io.ReadFull(n.r, n.data); err != nil {
		return nil, err
	}
	if n.srv.cfg.TLSRequired && !n.tls {
		switch h.Opt {
		case OptStartTLS, OptAbort:
		case OptExportName:
			return nil, errors.New("NBD_OPT_EXPORT_NAME before STARTTLS on a TLS-only server")
		default:
			return nil, n.replyErr(RepErrTLSReqd, "TLS is required")
		}
	}
	switch h.Opt {
	case OptExportName:
		return n.optExportName()
	case OptAbort:
		n.reply(RepAck, nil)
		return nil, errAborted
	case OptList:
		return nil, n.optList()
	case OptStartTLS:
		return nil, n.optStartTLS()
	case OptInfo, OptGo:
		return n.optInfo()
	case OptStructuredReply:
		return nil, n.optStructuredReply()
	case OptExtendedHeaders:
		return nil, n.optExtendedHeaders()
	case OptListMetaContext, OptSetMetaContext:
		return nil, n.optMetaContext()
	}
	return nil, n.replyErr(RepErrUnsup, "unsupported option "+h.Opt.String())
}

// reply sends one option reply.
func (n *negotiation) reply(typ Reply, data []byte) error {
	b := OptReply{Opt: n.opt, Type: typ, Length: uint32(len(data))}.Append(make([]byte, 0, OptReplyHeaderLen+len(data)))
	_, err := n.conn.Write(append(b, data...))
	return err
}

// replyErr sends an error reply with a message for humans.
func (n *negotiation) replyErr(typ Reply, msg string) error {
	return n.reply(typ, []byte(msg))
}

// optExportName answers NBD_OPT_EXPORT_NAME: no reply on failure, the
// connection just closes.
func (n *negotiation) optExportName() (*session, error) {
	name := string(n.data)
	exp := n.srv.export(name)
	if exp == nil {
		return nil, fmt.Errorf("NBD_OPT_EXPORT_NAME: unknown export %q", name)
	}
	n.dropContextsUnless(exp)
	flags := transmissionFlags(exp, n.mode, len(n.contexts) > 0)
	b := be.AppendUint64(nil, uint64(exp.Image.Size()))
	b = be.AppendUint16(b, flags)
	if !n.noZeroes {
		b = append(b, make([]byte, 124)...)
	}
	if _, err := n.conn.Write(b); err != nil {
		return nil, err
	}
	return n.session(exp, flags), nil
}

// optList answers NBD_OPT_LIST with every export.
func (n *negotiation) optList() error {
	if len(n.data) != 0 {
		return n.replyErr(RepErrInvalid, "NBD_OPT_LIST takes no data")
	}
	for _, e := range n.srv.cfg.Exports {
		b := AppendString(nil, e.Name)
		b = append(b, e.Description...)
		if err := n.reply(RepServer, b); err != nil {
			return err
		}
	}
	return n.reply(RepAck, nil)
}

// optStartTLS upgrades the connection. All negotiated state is reset, as
// the spec requires.
func (n *negotiation) optStartTLS() error {
	switch {
	case len(n.data) != 0:
		return n.replyErr(RepErrInvalid, "NBD_OPT_STARTTLS takes no data")
	case n.srv.cfg.TLS == nil:
		return n.replyErr(RepErrPolicy, "TLS not configured")
	case n.tls:
		return n.replyErr(RepErrInvalid, "TLS already negotiated")
	}
	if n.r.Buffered() != 0 {
		return errors.New("NBD_OPT_STARTTLS: client sent data before the TLS handshake")
	}
	if err := n.reply(RepAck, nil); err != nil {
		return err
	}
	tc := tls.Server(n.conn, n.srv.cfg.TLS)
	if err := tc.Handshake(); err != nil {
		return fmt.Errorf("TLS handshake: %w", err)
	}
	n.conn, n.tls = tc, true
	n.r = bufio.NewReaderSize(tc, 4096)
	n.mode, n.contexts, n.ctxFor = ModeSimple, nil, nil
	return nil
}

// optInfo answers NBD_OPT_INFO and NBD_OPT_GO.
func (n *negotiation) optInfo() (*session, error) {
	req, err := DecodeInfoRequest(n.data)
	if err != nil {
		return nil, n.replyErr(RepErrInvalid, err.Error())
	}
	exp := n.srv.export(req.Export)
	if exp == nil {
		return nil, n.replyErr(RepErrUnknown, fmt.Sprintf("export %q not available", req.Export))
	}
	payload := len(n.contexts) > 0 && n.ctxFor == exp
	if n.opt == OptInfo {
		payload = true // QEMU advertises it on INFO once extended headers are on
	}
	flags := transmissionFlags(exp, n.mode, payload)
	if err := n.sendInfos(exp, req, flags); err != nil {
		return nil, err
	}
	if err := n.reply(RepAck, nil); err != nil {
		return nil, err
	}
	if n.opt == OptInfo {
		return nil, nil
	}
	n.dropContextsUnless(exp)
	return n.session(exp, flags), nil
}

// sendInfos sends NBD_INFO_EXPORT, NBD_INFO_BLOCK_SIZE and the requested
// name and description.
func (n *negotiation) sendInfos(exp *Export, req InfoRequest, flags uint16) error {
	b := be.AppendUint16(nil, InfoExport)
	b = be.AppendUint64(b, uint64(exp.Image.Size()))
	b = be.AppendUint16(b, flags)
	if err := n.reply(RepInfo, b); err != nil {
		return err
	}
	for _, t := range req.Infos {
		var b []byte
		switch t {
		case InfoName:
			b = append(be.AppendUint16(nil, InfoName), exp.Name...)
		case InfoDescription:
			if exp.Description == "" {
				continue
			}
			b = append(be.AppendUint16(nil, InfoDescription), exp.Description...)
		default:
			continue
		}
		if err := n.reply(RepInfo, b); err != nil {
			return err
		}
	}
	b = be.AppendUint16(nil, InfoBlockSize)
	b = be.AppendUint32(b, 1)
	b = be.AppendUint32(b, 4096)
	b = be.AppendUint32(b, uint32(n.srv.cfg.MaxRequest))
	return n.reply(RepInfo, b)
}

// optStructuredReply answers NBD_OPT_STRUCTURED_REPLY.
func (n *negotiation) optStructuredReply() error {
	switch {
	case len(n.data) != 0:
		return n.replyErr(RepErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
	case n.mode == ModeExtended:
		return n.replyErr(RepErrExtHeaderReqd, "extended headers already negotiated")
	case n.mode == ModeStructured:
		return n.replyErr(RepErrInvalid, "structured replies already negotiated")
	}
	n.mode = ModeStructured
	return n.reply(RepAck, nil)
}

// optExtendedHeaders answers NBD_OPT_EXTENDED_HEADERS. Extended headers
// imply structured replies.
func (n *negotiation) optExtendedHeaders() error {
	switch {
	case len(n.data) != 0:
		return n.replyErr(RepErrInvalid, "NBD_OPT_EXTENDED_HEADERS takes no data")
	case n.mode == ModeExtended:
		return n.replyErr(RepErrInvalid, "extended headers already negotiated")
	}
	n.mode = ModeExtended
	return n.reply(RepAck, nil)
}

// optMetaContext answers NBD_OPT_LIST_META_CONTEXT and
// NBD_OPT_SET_META_CONTEXT.
func (n *negotiation) optMetaContext() error {
	if n.opt == OptSetMetaContext {
		n.contexts, n.ctxFor = nil, nil
	}
	if n.mode < ModeStructured {
		return n.replyErr(RepErrInvalid, "structured replies must be negotiated first")
	}
	req, err := DecodeMetaContextRequest(n.data)
	if err != nil {
		if errors.Is(err, ErrTooLong) {
			return n.replyErr(RepErrTooBig, err.Error())
		}
		return n.replyErr(RepErrInvalid, err.Error())
	}
	exp := n.srv.export(req.Export)
	if exp == nil {
		return n.replyErr(RepErrUnknown, fmt.Sprintf("export %q not available", req.Export))
	}
	names := metactx.Names(exp.Image)
	var chosen []string
	if n.opt == OptListMetaContext {
		chosen = listContexts(names, req.Queries)
	} else {
		chosen = setContexts(names, req.Queries)
	}
	for i, name := range chosen {
		id := uint32(0) // ids of LIST replies mean nothing
		if n.opt == OptSetMetaContext {
			id = uint32(i)
		}
		if err := n.reply(RepMetaContext, append(be.AppendUint32(nil, id), name...)); err != nil {
			return err
		}
	}
	if n.opt == OptSetMetaContext {
		n.contexts, n.ctxFor = chosen, exp
	}
	return n.reply(RepAck, nil)
}

// listContexts answers LIST queries: none lists all; "base:", "qemu:" and
// "qemu:dirty-bitmap:" list their families; anything else must match a
// name exactly.
func listContexts(names, queries []string) []string {
	if len(queries) == 0 {
		return names
	}
	var out []string
	seen := map[string]bool{}
	for _, q := range queries {
		for _, name := range names {
			if matchesQuery(name, q) && !seen[name] {
				seen[name] = true
				out = append(out, name)
			}
		}
	}
	return out
}

func matchesQuery(name, q string) bool {
	switch q {
	case "base:", "qemu:", metactx.DirtyBitmapPrefix:
		return strings.HasPrefix(name, q)
	}
	return name == q
}

// setContexts selects the contexts named exactly by SET queries, once
// each, in query order. An empty list selects none.
func setContexts(names, queries []string) []string {
	var out []string
	seen := map[string]bool{}
	for _, q := range queries {
		if seen[q] {
			continue
		}
		for _, name := range names {
			if name == q {
				seen[q] = true
				out = append(out, name)
				break
			}
		}
	}
	return out
}

// dropContextsUnless forgets contexts negotiated for another export.
func (n *negotiation) dropContextsUnless(exp *Export) {
	if n.ctxFor != exp {
		n.contexts, n.ctxFor = nil, nil
	}
}

// session builds the transmission session after a successful GO or
// EXPORT_NAME.
func (n *negotiation) session(exp *Export, flags uint16) *session {
	return &session{
		srv:      n.srv,
		conn:     n.conn,
		r:        n.r,
		exp:      exp,
		mode:     n.mode,
		contexts: n.contexts,
		flags:    flags,
		zeroCopy: canSendfile(n.conn) && !exp.Writable && !exp.Image.Writable(), // see doc.go
		slots:    make(chan struct{}, n.srv.cfg.MaxInFlight),
		mem:      n.srv.mem.conn(n.srv.cfg.MaxConnBufferBytes, connFloor),
	}
}
