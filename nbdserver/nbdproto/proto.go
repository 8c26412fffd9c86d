package nbdproto

import (
	"fmt"
	"strings"
)

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

// Flags are the transmission flags (NBD_FLAG_*) of an export.
type Flags uint16

// Transmission flags.
const (
	FlagHasFlags           Flags = 1 << 0
	FlagReadOnly           Flags = 1 << 1
	FlagSendFlush          Flags = 1 << 2
	FlagSendFUA            Flags = 1 << 3
	FlagRotational         Flags = 1 << 4
	FlagSendTrim           Flags = 1 << 5
	FlagSendWriteZeroes    Flags = 1 << 6
	FlagSendDF             Flags = 1 << 7
	FlagCanMultiConn       Flags = 1 << 8
	FlagSendResize         Flags = 1 << 9
	FlagSendCache          Flags = 1 << 10
	FlagSendFastZero       Flags = 1 << 11
	FlagBlockStatusPayload Flags = 1 << 12
)

var flagNames = []string{"NBD_FLAG_HAS_FLAGS", "NBD_FLAG_READ_ONLY", "NBD_FLAG_SEND_FLUSH",
	"NBD_FLAG_SEND_FUA", "NBD_FLAG_ROTATIONAL", "NBD_FLAG_SEND_TRIM", "NBD_FLAG_SEND_WRITE_ZEROES",
	"NBD_FLAG_SEND_DF", "NBD_FLAG_CAN_MULTI_CONN", "NBD_FLAG_SEND_RESIZE", "NBD_FLAG_SEND_CACHE",
	"NBD_FLAG_SEND_FAST_ZERO", "NBD_FLAG_BLOCK_STATUS_PAYLOAD"}

// String names the set flags, joined by "|"; unknown bits are in hex.
func (f Flags) String() string { return bitNames(uint64(f), flagNames) }

// bitNames names the bits of v by names[bit], "|"-separated, the
// unnamed rest in hex; "0" for none.
func bitNames(v uint64, names []string) string {
	if v == 0 {
		return "0"
	}
	var parts []string
	for i, n := range names {
		if v&(1<<i) != 0 {
			parts = append(parts, n)
			v &^= 1 << i
		}
	}
	if v != 0 {
		parts = append(parts, fmt.Sprintf("%#x", v))
	}
	return strings.Join(parts, "|")
}

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

// Info is an NBD_INFO_* information type of NBD_REP_INFO.
type Info uint16

// Info types of NBD_REP_INFO.
const (
	InfoExport      Info = 0
	InfoName        Info = 1
	InfoDescription Info = 2
	InfoBlockSize   Info = 3
)

var infoNames = [...]string{"NBD_INFO_EXPORT", "NBD_INFO_NAME", "NBD_INFO_DESCRIPTION", "NBD_INFO_BLOCK_SIZE"}

func (i Info) String() string {
	if int(i) < len(infoNames) {
		return infoNames[i]
	}
	return fmt.Sprintf("NBD_INFO_%d", uint16(i))
}

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

// CmdFlags are the flags of a transmission request (NBD_CMD_FLAG_*).
type CmdFlags uint16

// Command flags.
const (
	CmdFlagFUA        CmdFlags = 1 << 0
	CmdFlagNoHole     CmdFlags = 1 << 1
	CmdFlagDF         CmdFlags = 1 << 2
	CmdFlagReqOne     CmdFlags = 1 << 3
	CmdFlagFastZero   CmdFlags = 1 << 4
	CmdFlagPayloadLen CmdFlags = 1 << 5
)

var cmdFlagNames = []string{"NBD_CMD_FLAG_FUA", "NBD_CMD_FLAG_NO_HOLE", "NBD_CMD_FLAG_DF",
	"NBD_CMD_FLAG_REQ_ONE", "NBD_CMD_FLAG_FAST_ZERO", "NBD_CMD_FLAG_PAYLOAD_LEN"}

// String names the set flags, joined by "|"; unknown bits are in hex.
func (f CmdFlags) String() string { return bitNames(uint64(f), cmdFlagNames) }

// ReplyFlagDone marks the last chunk of a structured reply.
const ReplyFlagDone = 1 << 0

// ReplyType is an NBD_REPLY_TYPE_* structured reply chunk type. Errors
// have bit 15 set.
type ReplyType uint16

// Structured reply chunk types.
const (
	ReplyTypeNone           ReplyType = 0
	ReplyTypeOffsetData     ReplyType = 1
	ReplyTypeOffsetHole     ReplyType = 2
	ReplyTypeBlockStatus    ReplyType = 5
	ReplyTypeBlockStatusExt ReplyType = 6
	ReplyTypeError          ReplyType = 1<<15 + 1
	ReplyTypeErrorOffset    ReplyType = 1<<15 + 2
)

var replyTypeNames = map[ReplyType]string{
	ReplyTypeNone: "NBD_REPLY_TYPE_NONE", ReplyTypeOffsetData: "NBD_REPLY_TYPE_OFFSET_DATA",
	ReplyTypeOffsetHole: "NBD_REPLY_TYPE_OFFSET_HOLE", ReplyTypeBlockStatus: "NBD_REPLY_TYPE_BLOCK_STATUS",
	ReplyTypeBlockStatusExt: "NBD_REPLY_TYPE_BLOCK_STATUS_EXT", ReplyTypeError: "NBD_REPLY_TYPE_ERROR",
	ReplyTypeErrorOffset: "NBD_REPLY_TYPE_ERROR_OFFSET",
}

func (t ReplyType) String() string {
	if s, ok := replyTypeNames[t]; ok {
		return s
	}
	return fmt.Sprintf("NBD_REPLY_TYPE_%#x", uint16(t))
}

// IsError reports whether t is an error chunk.
func (t ReplyType) IsError() bool { return t&(1<<15) != 0 }
