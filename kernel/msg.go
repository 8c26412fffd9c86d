package kernel

import (
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/mdlayher/netlink"
)

// AnyIndex as ConnectConfig.Index lets the kernel pick a free device.
const AnyIndex = -1

// ConnectConfig is the body of a CONNECT request.
type ConnectConfig struct {
	// Index is the device number N of /dev/nbdN, or AnyIndex (any
	// negative value) to let the kernel choose a free device.
	Index int
	// Size is the device size in bytes.
	Size uint64
	// BlockSize is the logical block size; 0 leaves the kernel default (512).
	BlockSize uint64
	// ServerFlags are the NBD transmission flags (Flag*), including
	// nbdproto.FlagReadOnly for a read-only device.
	ServerFlags uint64
	// ClientFlags are Client* flags.
	ClientFlags uint64
	// Timeout is the per-request timeout; 0 leaves the kernel default.
	// Sent in whole seconds, rounded up.
	Timeout time.Duration
	// DeadConnTimeout is how long I/O waits for a dead connection to be
	// replaced by RECONFIGURE before it fails; 0: fail at once.
	DeadConnTimeout time.Duration
	// Sockets are the connected, negotiated socket descriptors; the kernel
	// takes its own reference to each one.
	Sockets []int
	// BackendIdentifier names the backend in /sys/block/nbdN/backend;
	// RECONFIGURE must then repeat it.
	BackendIdentifier string
}

// ReconfigureConfig is the body of a RECONFIGURE request. Zero fields are
// not sent.
type ReconfigureConfig struct {
	Index             uint32
	Sockets           []int // replacements for dead connections
	Timeout           time.Duration
	DeadConnTimeout   time.Duration
	ClientFlags       *uint64
	BackendIdentifier string
}

// DeviceStatus is one entry of a STATUS reply.
type DeviceStatus struct {
	Index     uint32
	Connected bool
}

// Limits of what a request may carry.
const (
	// maxSockets bounds the sockets of one CONNECT (nbd-client allows far
	// fewer; the kernel allocates per connection).
	maxSockets = 256
	// maxBackendIdentifier is a sanity bound on the backend identifier.
	maxBackendIdentifier = 4096
)

var (
	errNoSockets      = errors.New("no sockets")
	errTooManySockets = fmt.Errorf("more than %d sockets", maxSockets)
	errBadSocket      = errors.New("negative socket descriptor")
	errZeroSize       = errors.New("device size is zero")
	errBadIndex       = errors.New("device index out of range")
	errBackendTooLong = fmt.Errorf("backend identifier longer than %d bytes", maxBackendIdentifier)
	errBackendNUL     = errors.New("backend identifier contains NUL")
	errMissingIndex   = errors.New("reply has no device index")
	errMissingDevices = errors.New("reply has no device list")
	errBadDeviceItem  = errors.New("device list entry without index")
)

// seconds converts a timeout to whole seconds, rounding up so that a
// sub-second timeout does not become "no timeout".
func seconds(d time.Duration) uint64 {
	if d <= 0 {
		return 0
	}
	return uint64((d + time.Second - 1) / time.Second)
}

func encodeSockets(ae *netlink.AttributeEncoder, fds []int) error {
	if len(fds) > maxSockets {
		return errTooManySockets
	}
	for _, fd := range fds {
		if fd < 0 || fd > math.MaxInt32 {
			return errBadSocket
		}
	}
	ae.Nested(attrSockets, func(nae *netlink.AttributeEncoder) error {
		for _, fd := range fds {
			nae.Nested(sockItem, func(sae *netlink.AttributeEncoder) error {
				sae.Uint32(sockFD, uint32(fd))
				return nil
			})
		}
		return nil
	})
	return nil
}

func checkBackend(id string) error {
	if len(id) > maxBackendIdentifier {
		return errBackendTooLong
	}
	for i := 0; i < len(id); i++ {
		if id[i] == 0 {
			return errBackendNUL
		}
	}
	return nil
}

// encodeConnect encodes the attributes of a CONNECT request.
func encodeConnect(c ConnectConfig) ([]byte, error) {
	if len(c.Sockets) == 0 {
		return nil, errNoSockets
	}
	if c.Size == 0 {
		return nil, errZeroSize
	}
	if c.Index > math.MaxInt32 {
		return nil, errBadIndex
	}
	if err := checkBackend(c.BackendIdentifier); err != nil {
		return nil, err
	}
	ae := netlink.NewAttributeEncoder()
	if c.Index >= 0 {
		ae.Uint32(attrIndex, uint32(c.Index))
	}
	ae.Uint64(attrSizeBytes, c.Size)
	if c.BlockSize != 0 {
		ae.Uint64(attrBlockSizeBytes, c.BlockSize)
	}
	ae.Uint64(attrServerFlags, c.ServerFlags)
	if c.ClientFlags != 0 {
		ae.Uint64(attrClientFlags, c.ClientFlags)
	}
	if t := seconds(c.Timeout); t != 0 {
		ae.Uint64(attrTimeout, t)
	}
	if t := seconds(c.DeadConnTimeout); t != 0 {
		ae.Uint64(attrDeadConnTimeout, t)
	}
	if err := encodeSockets(ae, c.Sockets); err != nil {
		return nil, err
	}
	if c.BackendIdentifier != "" {
		ae.String(attrBackendIdentifier, c.BackendIdentifier)
	}
	return ae.Encode()
}

// encodeReconfigure encodes the attributes of a RECONFIGURE request.
func encodeReconfigure(c ReconfigureConfig) ([]byte, error) {
	if c.Index > math.MaxInt32 {
		return nil, errBadIndex
	}
	if err := checkBackend(c.BackendIdentifier); err != nil {
		return nil, err
	}
	ae := netlink.NewAttributeEncoder()
	ae.Uint32(attrIndex, c.Index)
	if t := seconds(c.Timeout); t != 0 {
		ae.Uint64(attrTimeout, t)
	}
	if t := seconds(c.DeadConnTimeout); t != 0 {
		ae.Uint64(attrDeadConnTimeout, t)
	}
	if c.ClientFlags != nil {
		ae.Uint64(attrClientFlags, *c.ClientFlags)
	}
	if len(c.Sockets) > 0 {
		if err := encodeSockets(ae, c.Sockets); err != nil {
			return nil, err
		}
	}
	if c.BackendIdentifier != "" {
		ae.String(attrBackendIdentifier, c.BackendIdentifier)
	}
	return ae.Encode()
}

// encodeIndex encodes a request carrying only NBD_ATTR_INDEX (DISCONNECT,
// STATUS of one device).
func encodeIndex(index uint32) ([]byte, error) {
	if index > math.MaxInt32 {
		return nil, errBadIndex
	}
	ae := netlink.NewAttributeEncoder()
	ae.Uint32(attrIndex, index)
	return ae.Encode()
}

// decodeIndex returns NBD_ATTR_INDEX from the attributes of a CONNECT reply
// or a LINK_DEAD notification.
func decodeIndex(b []byte) (uint32, error) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return 0, err
	}
	var (
		index uint32
		found bool
	)
	for ad.Next() {
		if ad.Type() == attrIndex {
			index = ad.Uint32()
			found = true
		}
	}
	if err := ad.Err(); err != nil {
		return 0, err
	}
	if !found {
		return 0, errMissingIndex
	}
	return index, nil
}

// decodeStatus decodes the attributes of a STATUS reply:
//
//	[NBD_ATTR_DEVICE_LIST]
//	  [NBD_DEVICE_ITEM]
//	    [NBD_DEVICE_INDEX]
//	    [NBD_DEVICE_CONNECTED]
//
// Unknown attributes are ignored, as the kernel may add some.
func decodeStatus(b []byte) ([]DeviceStatus, error) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return nil, err
	}
	var (
		devs  []DeviceStatus
		found bool
	)
	for ad.Next() {
		if ad.Type() != attrDeviceList {
			continue
		}
		found = true
		ad.Nested(func(lad *netlink.AttributeDecoder) error {
			for lad.Next() {
				if lad.Type() != deviceItem {
					continue
				}
				var (
					d        DeviceStatus
					hasIndex bool
				)
				lad.Nested(func(iad *netlink.AttributeDecoder) error {
					for iad.Next() {
						switch iad.Type() {
						case deviceIndex:
							d.Index = iad.Uint32()
							hasIndex = true
						case deviceConnected:
							d.Connected = iad.Uint8() != 0
						}
					}
					return iad.Err()
				})
				if lad.Err() != nil {
					return lad.Err()
				}
				if !hasIndex {
					return errBadDeviceItem
				}
				devs = append(devs, d)
			}
			return lad.Err()
		})
	}
	if err := ad.Err(); err != nil {
		return nil, err
	}
	if !found {
		return nil, errMissingDevices
	}
	return devs, nil
}
