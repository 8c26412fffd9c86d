package nbdserver

import (
	"bufio"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"github.com/nbdgw/nbdgw/internal/metactx"
	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
)

// Option data limits. NBD names and queries are at most 4 KiB
// (NBD_MAX_STRING_SIZE); meta context options carry several of them.
const (
	maxOptionLen     = 64 << 10 // larger options get NBD_REP_ERR_TOO_BIG
	maxOptionDiscard = 1 << 20  // larger ones drop the connection
)

var be = binary.BigEndian

// errAborted ends the handshake without a complaint worth logging.
var errAborted = errors.New("nbd: client aborted the handshake")

// negotiation is the option haggling state of one connection.
type negotiation struct {
	srv  *Server
	conn net.Conn // replaced by the TLS connection after STARTTLS
	r    *bufio.Reader

	noZeroes bool
	tls      bool
	mode     nbdproto.ReplyMode
	contexts []string // negotiated meta contexts; the id is the index
	ctxFor   *Export  // export the contexts were negotiated for

	opt  nbdproto.Option // option being answered
	data []byte          // its data

	held map[string]heldExport // exports this connection got from Config.Lookup
}

// heldExport is an export from Config.Lookup and its release.
type heldExport struct {
	exp     *Export
	release func()
}

// export finds name among Config.Exports, then through Config.Lookup
// (once per connection: later options get the same *Export).
func (n *negotiation) export(name string) (*Export, error) {
	if e := n.srv.export(name); e != nil {
		return e, nil
	}
	if n.srv.cfg.Lookup == nil {
		return nil, fmt.Errorf("export %q not available", name)
	}
	if h, ok := n.held[name]; ok {
		return h.exp, nil
	}
	e, release, err := n.srv.cfg.Lookup(name)
	if err != nil {
		return nil, err
	}
	if n.held == nil {
		n.held = map[string]heldExport{}
	}
	n.held[name] = heldExport{e, release}
	return e, nil
}

// release gives back every export from Config.Lookup but keep.
func (n *negotiation) release(keep *Export) {
	for name, h := range n.held {
		if h.exp != keep {
			if h.release != nil {
				h.release()
			}
			delete(n.held, name)
		}
	}
}

// run performs the handshake and returns the transmission session.
func (n *negotiation) run() (*session, error) {
	n.conn.SetDeadline(time.Now().Add(n.srv.cfg.HandshakeTimeout))
	n.r = bufio.NewReaderSize(n.conn, 4096)
	hello := be.AppendUint64(nil, nbdproto.NBDMagic)
	hello = be.AppendUint64(hello, nbdproto.OptsMagic)
	hello = be.AppendUint16(hello, nbdproto.HandshakeFixedNewstyle|nbdproto.HandshakeNoZeroes)
	if _, err := n.conn.Write(hello); err != nil {
		return nil, err
	}
	var cf [4]byte
	if _, err := io.ReadFull(n.r, cf[:]); err != nil {
		return nil, err
	}
	flags := be.Uint32(cf[:])
	if flags&^(nbdproto.ClientFixedNewstyle|nbdproto.ClientNoZeroes) != 0 {
		return nil, fmt.Errorf("unknown client flags %#x", flags)
	}
	n.noZeroes = flags&nbdproto.ClientNoZeroes != 0
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
	var hb [nbdproto.OptHeaderLen]byte
	if _, err := io.ReadFull(n.r, hb[:]); err != nil {
		return nil, err
	}
	h, err := nbdproto.DecodeOptHeader(hb[:])
	if err != nil {
		return nil, err
	}
	n.opt, n.data = h.Opt, nil
	if h.Length > maxOptionLen {
		if h.Length > maxOptionDiscard || h.Opt == nbdproto.OptExportName {
			return nil, fmt.Errorf("%v: %d bytes of option data", h.Opt, h.Length)
		}
		if _, err := io.CopyN(io.Discard, n.r, int64(h.Length)); err != nil {
			return nil, err
		}
		return nil, n.replyErr(nbdproto.RepErrTooBig, "option data too long")
	}
	n.data = make([]byte, h.Length)
	if _, err := io.ReadFull(n.r, n.data); err != nil {
		return nil, err
	}
	if n.srv.cfg.TLSRequired && !n.tls {
		switch h.Opt {
		case nbdproto.OptStartTLS, nbdproto.OptAbort:
		case nbdproto.OptExportName:
			return nil, errors.New("NBD_OPT_EXPORT_NAME before STARTTLS on a TLS-only server")
		default:
			return nil, n.replyErr(nbdproto.RepErrTLSReqd, "TLS is required")
		}
	}
	switch h.Opt {
	case nbdproto.OptExportName:
		return n.optExportName()
	case nbdproto.OptAbort:
		n.reply(nbdproto.RepAck, nil)
		return nil, errAborted
	case nbdproto.OptList:
		return nil, n.optList()
	case nbdproto.OptStartTLS:
		return nil, n.optStartTLS()
	case nbdproto.OptInfo, nbdproto.OptGo:
		return n.optInfo()
	case nbdproto.OptStructuredReply:
		return nil, n.optStructuredReply()
	case nbdproto.OptExtendedHeaders:
		return nil, n.optExtendedHeaders()
	case nbdproto.OptListMetaContext, nbdproto.OptSetMetaContext:
		return nil, n.optMetaContext()
	}
	return nil, n.replyErr(nbdproto.RepErrUnsup, "unsupported option "+h.Opt.String())
}

// reply sends one option reply.
func (n *negotiation) reply(typ nbdproto.Reply, data []byte) error {
	b := nbdproto.OptReply{Opt: n.opt, Type: typ, Length: uint32(len(data))}.Append(make([]byte, 0, nbdproto.OptReplyHeaderLen+len(data)))
	_, err := n.conn.Write(append(b, data...))
	return err
}

// replyErr sends an error reply with a message for humans.
func (n *negotiation) replyErr(typ nbdproto.Reply, msg string) error {
	return n.reply(typ, []byte(msg))
}

// optExportName answers NBD_OPT_EXPORT_NAME: no reply on failure, the
// connection just closes.
func (n *negotiation) optExportName() (*session, error) {
	name := string(n.data)
	exp, err := n.export(name)
	if err != nil {
		return nil, fmt.Errorf("NBD_OPT_EXPORT_NAME: %w", err)
	}
	n.dropContextsUnless(exp)
	flags := transmissionFlags(exp, n.mode, len(n.contexts) > 0)
	b := be.AppendUint64(nil, uint64(exp.Image.Size()))
	b = be.AppendUint16(b, uint16(flags))
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
		return n.replyErr(nbdproto.RepErrInvalid, "NBD_OPT_LIST takes no data")
	}
	list := make([]ExportInfo, 0, len(n.srv.cfg.Exports))
	for _, e := range n.srv.cfg.Exports {
		list = append(list, ExportInfo{e.Name, e.Description})
	}
	if n.srv.cfg.List != nil {
		for _, e := range n.srv.cfg.List() {
			if n.srv.export(e.Name) == nil || e.Name == "" { // Exports win
				list = append(list, e)
			}
		}
	}
	for _, e := range list {
		b := nbdproto.AppendString(nil, e.Name)
		b = append(b, e.Description...)
		if err := n.reply(nbdproto.RepServer, b); err != nil {
			return err
		}
	}
	return n.reply(nbdproto.RepAck, nil)
}

// optStartTLS upgrades the connection. All negotiated state is reset, as
// the spec requires.
func (n *negotiation) optStartTLS() error {
	switch {
	case len(n.data) != 0:
		return n.replyErr(nbdproto.RepErrInvalid, "NBD_OPT_STARTTLS takes no data")
	case n.srv.cfg.TLS == nil && n.srv.cfg.PSK == nil:
		return n.replyErr(nbdproto.RepErrPolicy, "TLS not configured")
	case n.tls:
		return n.replyErr(nbdproto.RepErrInvalid, "TLS already negotiated")
	}
	if n.r.Buffered() != 0 {
		return errors.New("NBD_OPT_STARTTLS: client sent data before the TLS handshake")
	}
	if err := n.reply(nbdproto.RepAck, nil); err != nil {
		return err
	}
	var tc net.Conn
	if n.srv.cfg.PSK != nil {
		var err error
		if tc, err = n.srv.cfg.PSK.Server(n.conn); err != nil {
			return err
		}
	} else {
		t := tls.Server(n.conn, n.srv.cfg.TLS)
		if err := t.Handshake(); err != nil {
			return fmt.Errorf("TLS handshake: %w", err)
		}
		tc = t
	}
	n.conn, n.tls = tc, true
	n.r = bufio.NewReaderSize(tc, 4096)
	n.mode, n.contexts, n.ctxFor = nbdproto.ModeSimple, nil, nil
	return nil
}

// optInfo answers NBD_OPT_INFO and NBD_OPT_GO.
func (n *negotiation) optInfo() (*session, error) {
	req, err := nbdproto.DecodeInfoRequest(n.data)
	if err != nil {
		return nil, n.replyErr(nbdproto.RepErrInvalid, err.Error())
	}
	exp, err := n.export(req.Export)
	if err != nil {
		return nil, n.replyErr(nbdproto.RepErrUnknown, err.Error())
	}
	payload := len(n.contexts) > 0 && n.ctxFor == exp
	if n.opt == nbdproto.OptInfo {
		payload = true // QEMU advertises it on INFO once extended headers are on
	}
	flags := transmissionFlags(exp, n.mode, payload)
	if err := n.sendInfos(exp, req, flags); err != nil {
		return nil, err
	}
	if err := n.reply(nbdproto.RepAck, nil); err != nil {
		return nil, err
	}
	if n.opt == nbdproto.OptInfo {
		return nil, nil
	}
	n.dropContextsUnless(exp)
	return n.session(exp, flags), nil
}

// sendInfos sends NBD_INFO_EXPORT, NBD_INFO_BLOCK_SIZE and the requested
// name and description.
func (n *negotiation) sendInfos(exp *Export, req nbdproto.InfoRequest, flags nbdproto.Flags) error {
	b := be.AppendUint16(nil, uint16(nbdproto.InfoExport))
	b = be.AppendUint64(b, uint64(exp.Image.Size()))
	b = be.AppendUint16(b, uint16(flags))
	if err := n.reply(nbdproto.RepInfo, b); err != nil {
		return err
	}
	for _, t := range req.Infos {
		var b []byte
		switch t {
		case nbdproto.InfoName:
			b = append(be.AppendUint16(nil, uint16(nbdproto.InfoName)), exp.Name...)
		case nbdproto.InfoDescription:
			if exp.Description == "" {
				continue
			}
			b = append(be.AppendUint16(nil, uint16(nbdproto.InfoDescription)), exp.Description...)
		default:
			continue
		}
		if err := n.reply(nbdproto.RepInfo, b); err != nil {
			return err
		}
	}
	b = be.AppendUint16(nil, uint16(nbdproto.InfoBlockSize))
	b = be.AppendUint32(b, 1)
	b = be.AppendUint32(b, 4096)
	b = be.AppendUint32(b, uint32(n.srv.cfg.MaxRequest))
	return n.reply(nbdproto.RepInfo, b)
}

// optStructuredReply answers NBD_OPT_STRUCTURED_REPLY.
func (n *negotiation) optStructuredReply() error {
	switch {
	case len(n.data) != 0:
		return n.replyErr(nbdproto.RepErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
	case n.mode == nbdproto.ModeExtended:
		return n.replyErr(nbdproto.RepErrExtHeaderReqd, "extended headers already negotiated")
	case n.mode == nbdproto.ModeStructured:
		return n.replyErr(nbdproto.RepErrInvalid, "structured replies already negotiated")
	}
	n.mode = nbdproto.ModeStructured
	return n.reply(nbdproto.RepAck, nil)
}

// optExtendedHeaders answers NBD_OPT_EXTENDED_HEADERS. Extended headers
// imply structured replies.
func (n *negotiation) optExtendedHeaders() error {
	switch {
	case len(n.data) != 0:
		return n.replyErr(nbdproto.RepErrInvalid, "NBD_OPT_EXTENDED_HEADERS takes no data")
	case n.mode == nbdproto.ModeExtended:
		return n.replyErr(nbdproto.RepErrInvalid, "extended headers already negotiated")
	}
	n.mode = nbdproto.ModeExtended
	return n.reply(nbdproto.RepAck, nil)
}

// optMetaContext answers NBD_OPT_LIST_META_CONTEXT and
// NBD_OPT_SET_META_CONTEXT.
func (n *negotiation) optMetaContext() error {
	if n.opt == nbdproto.OptSetMetaContext {
		n.contexts, n.ctxFor = nil, nil
	}
	if n.mode < nbdproto.ModeStructured {
		return n.replyErr(nbdproto.RepErrInvalid, "structured replies must be negotiated first")
	}
	req, err := nbdproto.DecodeMetaContextRequest(n.data)
	if err != nil {
		if errors.Is(err, nbdproto.ErrTooLong) {
			return n.replyErr(nbdproto.RepErrTooBig, err.Error())
		}
		return n.replyErr(nbdproto.RepErrInvalid, err.Error())
	}
	exp, err := n.export(req.Export)
	if err != nil {
		return n.replyErr(nbdproto.RepErrUnknown, err.Error())
	}
	names := metactx.Names(exp.Image)
	var chosen []string
	if n.opt == nbdproto.OptListMetaContext {
		chosen = listContexts(names, req.Queries)
	} else {
		chosen = setContexts(names, req.Queries)
	}
	for i, name := range chosen {
		id := uint32(0) // ids of LIST replies mean nothing
		if n.opt == nbdproto.OptSetMetaContext {
			id = uint32(i)
		}
		if err := n.reply(nbdproto.RepMetaContext, append(be.AppendUint32(nil, id), name...)); err != nil {
			return err
		}
	}
	if n.opt == nbdproto.OptSetMetaContext {
		n.contexts, n.ctxFor = chosen, exp
	}
	return n.reply(nbdproto.RepAck, nil)
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
func (n *negotiation) session(exp *Export, flags nbdproto.Flags) *session {
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
