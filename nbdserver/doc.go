// Package nbdserver speaks the NBD protocol (../shared/reference/nbd-proto.md)
// for nbdgw: a server that exports qcow2 chains opened by package qcow2,
// and a small client used by nbdgw map NBD-URI and nbdgw attach. Both
// sides share the wire encoding in wire.go: each message has an append
// (encode) function over byte slices and a decode function that checks
// every length before slicing.
//
// The server implements fixed newstyle negotiation with NO_ZEROES and
// the options EXPORT_NAME, ABORT, LIST, INFO, GO, STARTTLS,
// STRUCTURED_REPLY, EXTENDED_HEADERS, LIST_META_CONTEXT and
// SET_META_CONTEXT (anything else is NBD_REP_ERR_UNSUP). Every metadata
// context of package metactx is offered: base:allocation,
// qemu:allocation-depth, qemu:joint-allocation and
// qemu:dirty-bitmap:NAME. Exports are read-only: writes, trims and
// write-zeroes answer NBD_EPERM (after consuming a write's payload).
//
// Replies come in three framings, chosen by negotiation: simple replies,
// structured replies (NBD_OPT_STRUCTURED_REPLY) and extended headers
// (NBD_OPT_EXTENDED_HEADERS: 64-bit lengths, NBD_REPLY_TYPE_BLOCK_STATUS_EXT,
// block status payloads selecting a subset of the negotiated contexts).
// With extended headers one NBD_CMD_BLOCK_STATUS can describe the whole
// export: the engine streams extents and the server stops only at the
// reply size limit below.
//
// # Concurrency
//
// A Server serves any number of connections (up to
// Config.MaxConnections), one goroutine each for option haggling and for
// reading requests. Each request is then handled on its own goroutine;
// at most Config.MaxInFlight run per connection, and the reader blocks
// when all slots are taken, which pushes back on the client. Requests are
// answered out of order. A handler builds its whole reply after the I/O
// it reports has finished and writes it under the connection's send lock
// in one go, so chunks of different replies never interleave mid-chunk.
// A panic in a handler is recovered, logged and answered with NBD_EIO.
// NBD_CMD_DISC waits for the requests in flight before the connection
// closes. The engine (qcow2.Image) is safe for concurrent reads, so
// connections share it; NBD_FLAG_CAN_MULTI_CONN is advertised.
//
// One exception, for speed: on plain TCP and unix sockets, data clusters
// that the engine maps to a host file offset (qemu-img map's "offset")
// are sent with sendfile(2) straight from that file, after the engine has
// answered block status for the range. The kernel then reads while the
// reply is sent; should that read fail, the connection is dropped (a
// hard disconnect, which the spec allows), as a reply may be half sent.
// Compressed clusters, TLS connections and anything the engine cannot
// map are read through the engine before any byte is sent. Exports are
// read-only, so no write can race with these reads.
//
// The Client is synchronous: one request at a time under its mutex.
//
// # Limits
//
// Every length read off the wire is checked before anything is
// allocated for it:
//   - option data: at most 64 KiB is read (NBD_REP_ERR_TOO_BIG is sent
//     for up to 1 MiB, which is discarded; more drops the connection);
//     names and queries at most 4 KiB, at most 1024 queries;
//   - NBD_CMD_READ: at most Config.MaxRequest (32 MiB, like QEMU), else
//     NBD_EINVAL; NBD_CMD_WRITE payloads above it drop the connection;
//   - block status payloads: at most 8 bytes plus 4 per negotiated
//     context are read; longer ones up to Config.MaxRequest are discarded
//     and answered NBD_EINVAL, larger ones drop the connection;
//   - block status replies: at most 1 MiB of descriptors per context
//     (131072 32-bit or 65536 64-bit extents), one with
//     NBD_CMD_FLAG_REQ_ONE; 32-bit replies never exceed the 32-bit
//     request length;
//   - option haggling must finish within Config.HandshakeTimeout.
//
// The client bounds option replies to 64 KiB and reply chunks to 64 MiB.
package nbdserver
