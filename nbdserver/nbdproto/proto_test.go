package nbdproto

import "testing"

// TestString checks the NBD_* names of the typed values, known and not.
func TestString(t *testing.T) {
	for _, tc := range []struct {
		v    interface{ String() string }
		want string
	}{
		{FlagHasFlags | FlagReadOnly | FlagCanMultiConn, "NBD_FLAG_HAS_FLAGS|NBD_FLAG_READ_ONLY|NBD_FLAG_CAN_MULTI_CONN"},
		{FlagBlockStatusPayload | 1<<15, "NBD_FLAG_BLOCK_STATUS_PAYLOAD|0x8000"},
		{Flags(0), "0"},
		{CmdFlagFUA | CmdFlagPayloadLen, "NBD_CMD_FLAG_FUA|NBD_CMD_FLAG_PAYLOAD_LEN"},
		{CmdFlags(0x4000), "0x4000"},
		{InfoBlockSize, "NBD_INFO_BLOCK_SIZE"},
		{Info(9), "NBD_INFO_9"},
		{ReplyTypeBlockStatusExt, "NBD_REPLY_TYPE_BLOCK_STATUS_EXT"},
		{ReplyTypeErrorOffset, "NBD_REPLY_TYPE_ERROR_OFFSET"},
		{ReplyType(3), "NBD_REPLY_TYPE_0x3"},
		{CmdBlockStatus, "NBD_CMD_BLOCK_STATUS"},
		{OptExtendedHeaders, "NBD_OPT_EXTENDED_HEADERS"},
		{RepErrTLSReqd, "NBD_REP_ERR_TLS_REQD"},
		{ENOSPC, "ENOSPC"},
	} {
		if got := tc.v.String(); got != tc.want {
			t.Errorf("%T %d: %q, want %q", tc.v, tc.v, got, tc.want)
		}
	}
	if !ReplyTypeError.IsError() || ReplyTypeOffsetHole.IsError() {
		t.Error("ReplyType.IsError")
	}
}
