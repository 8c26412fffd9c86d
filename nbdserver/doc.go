// Package nbdserver speaks the NBD protocol (../shared/reference/nbd-proto.md)
// for nbdgw: a server that exports qcow2 chains opened by package qcow2.
// The protocol itself (constants, the wire encoding, errnos, NBD URIs,
// x509 credentials directories) is package nbdproto, which the server and
// the client (package nbdclient, used by nbdgw map NBD-URI and nbdgw
// attach) share.
//
// The server implements fixed newstyle negotiation with NO_ZEROES and
// the options EXPORT_NAME, ABORT, LIST, INFO, GO, STARTTLS,
// STRUCTURED_REPLY, EXTENDED_HEADERS, LIST_META_CONTEXT and
// SET_META_CONTEXT (anything else is NBD_REP_ERR_UNSUP). Every metadata
// context of package metactx is offered: base:allocation,
// qemu:allocation-depth, qemu:joint-allocation and
// qemu:dirty-bitmap:NAME.
//
// # Writes
//
// Exports are read-only unless Export.Writable is set (the image was
// opened writable). A read-only export advertises NBD_FLAG_READ_ONLY and
// answers WRITE, TRIM and WRITE_ZEROES with NBD_EPERM (a write's payload
// is consumed first); FLUSH succeeds and does nothing. A writable export
// advertises SEND_FLUSH, SEND_FUA,
// SEND_TRIM, SEND_WRITE_ZEROES, SEND_FAST_ZERO and CAN_MULTI_CONN, and:
//   - WRITE calls Image.WriteAt; WRITE_ZEROES calls Image.WriteZeroes,
//     with qcow2.ZeroMayUnmap unless NBD_CMD_FLAG_NO_HOLE and with
//     qcow2.ZeroFast for NBD_CMD_FLAG_FAST_ZERO (qcow2.ErrNotFast, which
//     the engine returns before changing anything, is NBD_ENOTSUP); TRIM
//     calls Image.Discard, which releases the whole clusters of the range
//     (they then read as zeroes) and leaves partial ones alone;
//   - a reply is sent only after the engine call returned; with
//     NBD_CMD_FLAG_FUA, Image.Flush runs before the reply as well;
//   - FLUSH calls Image.Flush, which makes every write the engine has
//     completed durable, whatever connection sent it. Since replies follow
//     completion, a FLUSH on any connection covers every write answered on
//     every connection before it was sent: the cross-connection flush
//     semantics CAN_MULTI_CONN requires;
//   - ranges past the end: WRITE and WRITE_ZEROES answer NBD_ENOSPC, TRIM
//     NBD_EINVAL (as the spec recommends); engine errors are NBD_EIO, or
//     NBD_ENOSPC for ENOSPC, EDQUOT and EFBIG;
//   - payloads follow the limits below, and a write's buffer is allocated
//     only once a request slot is free: a connection holds at most
//     MaxInFlight payloads of at most MaxRequest bytes.
//
// Reads on a writable export, or on any export of an image opened
// writable (something else may write it), are not sent with sendfile
// (see below). Each NBD_CMD_READ reads its whole range with one engine
// call into a pooled buffer; the call holds the image's lock, which
// makes the reply the content at one instant even when writes to the
// same range run concurrently. Zero runs found by the earlier block
// status go out as holes only if that snapshot still reads zero there.
// Cost, measured by scripts/bench-nbd-write.sh: reading 1 GiB back takes
// about 1.4 times as long as with sendfile, as long as through qemu-nbd.
//
// Replies come in three framings, chosen by negotiation: simple replies,
// structured replies (NBD_OPT_STRUCTURED_REPLY) and extended headers
// (NBD_OPT_EXTENDED_HEADERS: 64-bit lengths, NBD_REPLY_TYPE_BLOCK_STATUS_EXT,
// block status payloads selecting a subset of the negotiated contexts).
// With extended headers one NBD_CMD_BLOCK_STATUS can describe the whole
// export: the engine streams extents and the server stops only at the
// reply size limit below.
//
// QEMU 10.0 is the peer this follows; 7.2 knew neither side of extended
// headers. qemu-img and qemu-io 10.0 negotiate them with the server,
// qemu-nbd 10.0 grants them to the client, and the misuses of block status
// payloads (no context, an id not negotiated or named twice, more ids than
// contexts, a payload on a command that takes none) get the errno
// qemu-nbd 10.0 answers, NBD_EINVAL, on a connection that stays usable
// (integration.TestBlockStatusPayloadMisuse).
//
// # Concurrency
//
// A Server serves up to Config.MaxConnections connections (see
// Connection admission), one goroutine each for option haggling and for
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
// Two exceptions. Large reads through the engine on read-only exports are
// streamed under the send lock, piece by piece (see Memory under stalled
// readers), so that a stalled reader holds one piece and not its whole
// reply. And, for speed: on plain TCP and unix sockets, data clusters
// that the engine maps to a host file offset (qemu-img map's "offset")
// are sent with sendfile(2) straight from the engine's own open handle on
// that file (qcow2.Image.HostFile), after the engine has answered block
// status for the range. This departs from "reply only after the I/O has
// finished" knowingly: it halves the server's CPU per byte and is what
// makes nbdcopy of an allocated image 1.6-2x faster than qemu-nbd. The kernel then reads while the
// reply is sent; should that read fail, the connection is dropped (a
// hard disconnect, which the spec allows), as a reply may be half sent.
// Compressed clusters, TLS connections and anything the engine cannot
// map are read through the engine before any byte is sent. This is only
// done for read-only exports: on a writable one a write could move or
// rewrite the host cluster between the block status and the sendfile
// (compressed or copied clusters are reallocated, trimmed ones reused
// after a flush), and the reply would carry another cluster's data or a
// mix of two writes.
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
//   - block status: at most 65536 engine lookups per context and request
//     (the part walked is answered), so a crafted image cannot make one
//     request walk for minutes;
//   - a reply must be taken by the client within Config.SendTimeout (a
//     minute), else the connection is dropped and its budget freed.
//
// # Memory under stalled readers
//
// A client that stops reading its replies holds back its own connection
// only, and bounded memory:
//   - reads sent with sendfile and zero runs hold no buffer (zeroes are
//     written from one static buffer);
//   - a read whose bytes through the engine (compressed clusters, TLS
//     connections, anything not mappable to a host file) are at most
//     256 KiB is read before the send lock into pooled buffers that count
//     against the budget below; a larger one is streamed: read through
//     the engine in pieces of 128 KiB under the send lock, each piece its
//     own NBD_REPLY_TYPE_OFFSET_DATA chunk with structured replies (a
//     failed piece is answered NBD_REPLY_TYPE_ERROR_OFFSET and ends the
//     reply), or raw bytes after a simple reply header (a failed piece
//     drops the connection, as the header promised the data). A stalled
//     connection thus holds one piece, whatever its reads' lengths;
//   - write payloads, reads on writable exports (one engine call over the
//     whole range, see Writes) and block status chunks count against the
//     connection's share, Config.MaxConnBufferBytes (64 MiB), of which the
//     first 256 KiB are the connection's own, and beyond that against the
//     pool shared by all connections, Config.MaxBufferBytes (128 MiB).
//     Memory held for requests is therefore at most 128 MiB plus 256 KiB
//     and one 128 KiB piece per connection; the engine's caches
//     (decompressed clusters included) are bounded per image by package
//     qcow2;
//   - waiting for the budget is not first come, first served: when bytes
//     are released every waiter that now fits proceeds, so a small request
//     never queues behind a large one, and thanks to the connection's own
//     256 KiB a small request gets through even when stalled clients hold
//     the whole pool.
//
// Measured by integration.TestAdmissionStalledReaders: with 64 clients
// each holding a 32 MiB read unread, a fresh client's 4 KiB reads take
// milliseconds and the server's peak RSS stays in tens of MiB, on plain
// (sendfile) and compressed images.
//
// # Connection admission
//
// The policy, like a daemon's (and qemu-nbd's where it has one):
//   - at most Config.MaxConnections (4096) connections are served at
//     once, handshaking or not; beyond that the server stops accepting
//     and new connections wait in the kernel's listen backlog, as with
//     qemu-nbd --shared, instead of being closed;
//   - option haggling (TLS included) must finish within
//     Config.HandshakeTimeout (10 s, qemu-nbd's --handshake-limit), else
//     the connection is closed: silent connections cost a slot for 10 s;
//   - at most Config.MaxPerAddress (64) connections from one client IP
//     address may be in the handshake at once; more from that address are
//     closed at once and logged (unix socket peers have no address and are
//     not limited). A flood from one address thus cannot hold the slots
//     others need for long, and cannot make them wait;
//   - a client that finished the handshake is not limited by address and
//     has no idle timeout (the kernel's nbd client idles for hours
//     legitimately): it counts only against MaxConnections, which is set
//     high so that idle clients do not lock out new ones
//     (TestAdmissionHandshakenIdle: 256 idle, a new one served at once;
//     TestAdmissionIdleConnections: 2000 silent connections, a new
//     client served at once).
//
// Export names and descriptions are at most 4096 bytes (Config.Validate,
// checked by nbdgw serve at start, as qemu-nbd does).
//
// # TLS
//
// nbdproto.LoadServerTLS checks the x509 credentials at start (readable files, a
// key matching its certificate, validity dates, the server certificate
// signed by the CA) and explains why the certificate request names no
// CAs: GnuTLS clients (libnbd, QEMU) with RSA certificates would
// otherwise send none in TLS 1.3. Config.PSK makes STARTTLS a TLS-PSK
// handshake instead, through GnuTLS (internal/gnutlspsk, cgo): crypto/tls
// has no PSK key exchange, and no Go module served by the module proxy
// provides one. A build without cgo has no TLS-PSK (gnutlspsk.Load fails).
//
// The client bounds option replies to 64 KiB and reply chunks to 64 MiB.
package nbdserver
