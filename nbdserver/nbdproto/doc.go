// Package nbdproto is the NBD protocol (../../shared/reference/nbd-proto.md)
// as both sides of nbdgw speak it: the server (package nbdserver), the
// client (package nbdclient), the hostile-client tool (internal/hostile)
// and the tests.
//
// It holds the magic numbers, the typed flags, commands, options, reply
// and info types with their NBD_* names (String), the NBD errno values
// and their mapping to and from syscall errors, the wire encoding (each
// message has an Append function over byte slices and a Decode function
// that checks every length before slicing), NBD URIs (ParseURI, IsURI)
// and the x509 credentials directories of QEMU's tls-creds-x509 and
// libnbd's tls-certificates (LoadServerTLS, LoadClientTLS).
//
// ServerError is an error reply as a client sees it; it unwraps to its
// Errno, which matches the corresponding syscall.Errno, so
// errors.Is(err, syscall.EIO) holds for an NBD_EIO reply.
package nbdproto
