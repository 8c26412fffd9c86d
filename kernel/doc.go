// Package kernel attaches NBD connections to Linux nbd block devices
// through the kernel's generic netlink family "nbd", as modern nbd-client
// does: the kernel picks a free /dev/nbdN, several sockets serve one
// device in parallel, and a dead connection is replaced with RECONFIGURE
// without tearing the device down.
//
// Conn speaks the family's commands (CONNECT, DISCONNECT, RECONFIGURE,
// STATUS); Watcher receives LINK_DEAD notifications from the nbd_mc_group
// multicast group. Open loads the nbd module with github.com/pmorjan/kmod
// when the family is not registered yet. Attach serves an image or an NBD
// URI on a device and stays until the device is disconnected.
//
// # Writes
//
// Devices are read-only (NBD_FLAG_READ_ONLY is added to the server's
// flags) unless AttachConfig.Writable is set. A writable local image must
// have been opened with qcow2.Options.Writable; the in-process server then
// offers WRITE, TRIM, WRITE_ZEROES, FUA and FLUSH, and the kernel gets its
// transmission flags as they are (SEND_FLUSH, SEND_FUA, SEND_TRIM,
// SEND_WRITE_ZEROES, CAN_MULTI_CONN), so the block layer turns on its write
// cache, FUA and discard, and every flush the kernel sends (sync, umount,
// blockdev --flushbufs) flushes the image. When the device goes away
// (detach, SIGINT/SIGTERM), Wait lets the in-process connections answer
// what they have in flight, then flushes the image; the caller closes it.
//
// # Error handling
//
// Every operation returns *Error, which names the operation and the
// device and wraps the cause: a sentinel (ErrNotSupported, ErrBusy,
// ErrNoDevice, ErrNotConnected, ErrIndexRange) and, for kernel refusals,
// the syscall.Errno. Use errors.Is.
//
// # Testing
//
// The message layer is tested against genltest's fake family without root;
// only Open, WatchLinkDead and the sockets need the real kernel, which the
// VM test (scripts/vmtest.sh) provides.
package kernel
