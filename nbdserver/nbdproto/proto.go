package nbdproto

import "fmt"

// Magic numbers of the handshake and transmission phases.
const (
	NBDMagic             = 0x4e42444d41474943 // "NBDMAGIC"
	OptsMagic            = 0x49484156454f5054 // "IHAVEOPT"
	RepMagic             = 0x0003e889045565a9 // option reply magic
	RequestMagic         = 0x25609513
	ExtendedRequestMagic = 0x21e41c71
	SimpleReplyMagic     = 0x67446698
	StructuredReplyMagic = 0x668e33ef
	ExtendedReplyMagic   = 0x6e8a278c
)

// Handshake flags (server) and client flags.
const (
	HandshakeFixedNewstyle = 1 << 0
	HandshakeNoZeroes      = 1 << 1

	ClientFixedNewstyle = 1 << 0
	ClientNoZeroes      = 1 << 1
)

// Transmission flags.
const (
	FlagHasFlags           = 1 << 0
	FlagReadOnly           = 1 << 1
	FlagSendFlush          = 1 << 2
	FlagSendFUA            = 1 << 3
	FlagRotational         = 1 << 4
	FlagSendTrim           = 1 << 5
	FlagSendWriteZeroes    = 1 << 6
	FlagSendDF             = 1 << 7
	FlagCanMultiConn       = 1 << 8
	FlagSendResize         = 1 << 9
	FlagSendCache          = 1 << 10
	FlagSendFastZero       = 1 << 11
	FlagBlockStatusPayload = 1 << 12
)

// Option is an NBD_OPT_* option type.
type Option uint32

// Options of the fixed newstyle handshake.
const (
	OptExportName      Option = 1
	OptAbort           Option = 2
	OptList            Option = 3
	OptPeekExport      Option = 4
	OptStartTLS        Option = 5
	OptInfo            Option = 6
	OptGo              Option = 7
	OptStructuredReply Option = 8
	OptListMetaContext Option = 9
	OptSetMetaContext  Option = 10
	OptExtendedHeaders Option = 11
)

var optionNames = map[Option]string{
	OptExportName: "NBD_OPT_EXPORT_NAME", OptAbort: "NBD_OPT_ABORT", OptList: "NBD_OPT_LIST",
	OptPeekExport: "NBD_OPT_PEEK_EXPORT", OptStartTLS: "NBD_OPT_STARTTLS", OptInfo: "NBD_OPT_INFO",
	OptGo: "NBD_OPT_GO", OptStructuredReply: "NBD_OPT_STRUCTURED_REPLY",
	OptListMetaContext: "NBD_OPT_LIST_META_CONTEXT", OptSetMetaContext: "NBD_OPT_SET_META_CONTEXT",
	OptExtendedHeaders: "NBD_OPT_EXTENDED_HEADERS",
}

func (o Option) String() string {
	if s, ok := optionNames[o]; ok {
		return s
	}
	return fmt.Sprintf("NBD_OPT_%d", uint32(o))
}

// Reply is an NBD_REP_* option reply type.
type Reply uint32

// Option reply types. Errors have bit 31 set.
const (
	RepAck              Reply = 1
	RepServer           Reply = 2
	RepInfo             Reply = 3
	RepMetaContext      Reply = 4
	repErr              Reply = 1 << 31
	RepErrUnsup         Reply = repErr + 1
	RepErrPolicy        Reply = repErr + 2
	RepErrInvalid       Reply = repErr + 3
	RepErrPlatform      Reply = repErr + 4
	RepErrTLSReqd       Reply = repErr + 5
	RepErrUnknown       Reply = repErr + 6
	RepErrShutdown      Reply = repErr + 7
	RepErrBlockSizeReqd Reply = repErr + 8
	RepErrTooBig        Reply = repErr + 9
	RepErrExtHeaderReqd Reply = repErr + 10
)

var replyNames = map[Reply]string{
	RepAck: "NBD_REP_ACK", RepServer: "NBD_REP_SERVER", RepInfo: "NBD_REP_INFO",
	RepMetaContext: "NBD_REP_META_CONTEXT", RepErrUnsup: "NBD_REP_ERR_UNSUP",
	RepErrPolicy: "NBD_REP_ERR_POLICY", RepErrInvalid: "NBD_REP_ERR_INVALID",
	RepErrPlatform: "NBD_REP_ERR_PLATFORM", RepErrTLSReqd: "NBD_REP_ERR_TLS_REQD",
	RepErrUnknown: "NBD_REP_ERR_UNKNOWN", RepErrShutdown: "NBD_REP_ERR_SHUTDOWN",
	RepErrBlockSizeReqd: "NBD_REP_ERR_BLOCK_SIZE_REQD", RepErrTooBig: "NBD_REP_ERR_TOO_BIG",
	RepErrExtHeaderReqd: "NBD_REP_ERR_EXT_HEADER_REQD",
}

func (r Reply) String() string {
	if s, ok := replyNames[r]; ok {
		return s
	}
	return fmt.Sprintf("NBD_REP_%#x", uint32(r))
}

// IsError reports whether r is an error reply.
func (r Reply) IsError() bool { return r&repErr != 0 }

// Info types of NBD_REP_INFO.
const (
	InfoExport      = 0
	InfoName        = 1
	InfoDescription = 2
	InfoBlockSize   = 3
)

// Command is an NBD_CMD_* request type.
type Command uint16

// Transmission commands.
const (
	CmdRead        Command = 0
	CmdWrite       Command = 1
	CmdDisc        Command = 2
	CmdFlush       Command = 3
	CmdTrim        Command = 4
	CmdCache       Command = 5
	CmdWriteZeroes Command = 6
	CmdBlockStatus Command = 7
	CmdResize      Command = 8
)

var commandNames = [...]string{"NBD_CMD_READ", "NBD_CMD_WRITE", "NBD_CMD_DISC", "NBD_CMD_FLUSH",
	"NBD_CMD_TRIM", "NBD_CMD_CACHE", "NBD_CMD_WRITE_ZEROES", "NBD_CMD_BLOCK_STATUS", "NBD_CMD_RESIZE"}

func (c Command) String() string {
	if int(c) < len(commandNames) {
		return commandNames[c]
	}
	return fmt.Sprintf("NBD_CMD_%d", uint16(c))
}

// Command flags.
const (
	CmdFlagFUA        = 1 << 0
	CmdFlagNoHole     = 1 << 1
	CmdFlagDF         = 1 << 2
	CmdFlagReqOne     = 1 << 3
	CmdFlagFastZero   = 1 << 4
	CmdFlagPayloadLen = 1 << 5
)

// Structured reply flags and types.
const (
	ReplyFlagDone = 1 << 0

	ReplyTypeNone           = 0
	ReplyTypeOffsetData     = 1
	ReplyTypeOffsetHole     = 2
	ReplyTypeBlockStatus    = 5
	ReplyTypeBlockStatusExt = 6
	ReplyTypeError          = 1<<15 + 1
	ReplyTypeErrorOffset    = 1<<15 + 2
)
