package kernel

import "strconv"

// Constants of the Linux nbd generic netlink family, from
// include/uapi/linux/nbd-netlink.h (golang.org/x/sys/unix has none).
const (
	familyName   = "nbd"
	familyVer    = 1
	mcGroupName  = "nbd_mc_group"
	moduleName   = "nbd"
	devicePrefix = "/dev/nbd"
)

// Configuration attributes (NBD_ATTR_*), used by CONNECT, RECONFIGURE,
// DISCONNECT, STATUS and LINK_DEAD.
const (
	attrIndex             = 1  // u32
	attrSizeBytes         = 2  // u64
	attrBlockSizeBytes    = 3  // u64
	attrTimeout           = 4  // u64, seconds
	attrServerFlags       = 5  // u64
	attrClientFlags       = 6  // u64
	attrSockets           = 7  // nested NBD_SOCK_ITEM
	attrDeadConnTimeout   = 8  // u64, seconds
	attrDeviceList        = 9  // nested NBD_DEVICE_ITEM
	attrBackendIdentifier = 10 // string
)

// NBD_ATTR_DEVICE_LIST contents.
const (
	deviceItem      = 1 // NBD_DEVICE_ITEM, nested
	deviceIndex     = 1 // NBD_DEVICE_INDEX, u32
	deviceConnected = 2 // NBD_DEVICE_CONNECTED, u8
)

// NBD_ATTR_SOCKETS contents.
const (
	sockItem = 1 // NBD_SOCK_ITEM, nested
	sockFD   = 1 // NBD_SOCK_FD, u32
)

// Command is a command of the nbd family (NBD_CMD_*).
type Command uint8

// The commands of the nbd family.
const (
	CmdConnect     Command = 1
	CmdDisconnect  Command = 2
	CmdReconfigure Command = 3
	CmdLinkDead    Command = 4
	CmdStatus      Command = 5
)

func (c Command) String() string {
	switch c {
	case CmdConnect:
		return "CONNECT"
	case CmdDisconnect:
		return "DISCONNECT"
	case CmdReconfigure:
		return "RECONFIGURE"
	case CmdLinkDead:
		return "LINK_DEAD"
	case CmdStatus:
		return "STATUS"
	}
	return "NBD_CMD_" + strconv.Itoa(int(c))
}

// The transmission flags the kernel is given are the NBD protocol's own
// (nbdproto.Flag*); include/uapi/linux/nbd.h defines the same bits.

// Client flags (NBD_CFLAG_*).
const (
	// ClientDestroyOnDisconnect deletes the device when it is disconnected.
	ClientDestroyOnDisconnect = 1 << 0
	// ClientDisconnectOnClose disconnects the device when its last opener closes it.
	ClientDisconnectOnClose = 1 << 1
)
