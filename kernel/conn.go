package kernel

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Options configure Open.
type Options struct {
	// ModuleRoot is where modules are looked up when the nbd family is
	// missing; default /lib/modules.
	ModuleRoot string
	// NoModuleLoad reports ErrNotSupported instead of loading the module.
	NoModuleLoad bool
}

// Conn is a connection to the kernel's nbd generic netlink family.
// Its methods may be called concurrently.
type Conn struct {
	c      *genetlink.Conn
	family genetlink.Family
	// dial opens another connection (for the multicast watcher).
	dial func() (*genetlink.Conn, error)
}

func dialKernel() (*genetlink.Conn, error) {
	c, err := genetlink.Dial(nil)
	if err != nil {
		return nil, err
	}
	// Best effort: error strings from the kernel's policy checks.
	_ = c.SetOption(netlink.ExtendedAcknowledge, true)
	return c, nil
}

// Open connects to the nbd family, loading the nbd module when the family
// is not registered yet. On a kernel without nbd support the error wraps
// ErrNotSupported.
func Open(opts Options) (*Conn, error) {
	c, err := dialKernel()
	if err != nil {
		return nil, &Error{Op: "open", Index: -1, Err: fmt.Errorf("generic netlink: %w", err)}
	}
	root := opts.ModuleRoot
	if root == "" {
		root = "/lib/modules"
	}
	load := func() error { return loadModule(root) }
	if opts.NoModuleLoad {
		load = func() error {
			return fmt.Errorf("%w: the generic netlink family %q is not registered (is the nbd module loaded?)", ErrNotSupported, familyName)
		}
	}
	nc, err := newConn(c, dialKernel, load)
	if err != nil {
		c.Close()
		return nil, err
	}
	return nc, nil
}

// newConn resolves the nbd family on c, calling load once if it is missing.
func newConn(c *genetlink.Conn, dial func() (*genetlink.Conn, error), load func() error) (*Conn, error) {
	f, err := c.GetFamily(familyName)
	if errors.Is(err, os.ErrNotExist) {
		if lerr := load(); lerr != nil {
			return nil, &Error{Op: "open", Index: -1, Err: lerr}
		}
		f, err = c.GetFamily(familyName)
		if errors.Is(err, os.ErrNotExist) {
			return nil, &Error{Op: "open", Index: -1, Err: fmt.Errorf("%w: the nbd module is loaded but the %q family is not registered", ErrNotSupported, familyName)}
		}
	}
	if err != nil {
		return nil, &Error{Op: "open", Index: -1, Err: fmt.Errorf("looking up generic netlink family %q: %w", familyName, err)}
	}
	return &Conn{c: c, family: f, dial: dial}, nil
}

// Close closes the connection.
func (c *Conn) Close() error { return c.c.Close() }

func (c *Conn) execute(cmd Command, attrs []byte, flags netlink.HeaderFlags) ([]genetlink.Message, error) {
	return c.c.Execute(genetlink.Message{
		Header: genetlink.Header{Command: uint8(cmd), Version: familyVer},
		Data:   attrs,
	}, c.family.ID, flags)
}

// Connect hands the sockets of cfg to the kernel and returns the device
// number it configured. On failure the kernel leaves no device configured.
func (c *Conn) Connect(cfg ConnectConfig) (int, error) {
	idx := cfg.Index
	if idx < 0 {
		idx = -1
	}
	fail := func(err error) (int, error) {
		return -1, &Error{Op: "connect", Index: idx, Err: err}
	}
	b, err := encodeConnect(cfg)
	if err != nil {
		return fail(err)
	}
	// No NLM_F_ACK: on success the kernel sends one reply carrying the
	// index; on failure an error message. An ACK would follow the reply in
	// a second datagram and be left behind in the socket.
	msgs, err := c.execute(CmdConnect, b, netlink.Request)
	if err != nil {
		return fail(connectErr(err, idx))
	}
	for _, m := range msgs {
		if Command(m.Header.Command) != CmdConnect {
			continue
		}
		i, err := decodeIndex(m.Data)
		if err != nil {
			return fail(err)
		}
		return int(i), nil
	}
	return fail(errMissingIndex)
}

func connectErr(err error, idx int) error {
	switch {
	case errors.Is(err, unix.EBUSY):
		return fmt.Errorf("%w: %w", ErrBusy, err)
	case errors.Is(err, unix.EINVAL) && idx >= 0:
		if max, ok := MaxIndex(); ok && idx > max {
			return fmt.Errorf("%w (the driver allows 0..%d): %w", ErrIndexRange, max, err)
		}
		return fmt.Errorf("the kernel refused the configuration (see dmesg): %w", err)
	case errors.Is(err, unix.EINVAL):
		return fmt.Errorf("the kernel refused the configuration (see dmesg): %w", err)
	case errors.Is(err, unix.EPERM):
		return fmt.Errorf("%w (CAP_SYS_ADMIN is required)", err)
	}
	return err
}

// Disconnect asks the kernel to disconnect device index. The kernel
// answers success for a device that is not connected, so STATUS is asked
// first to report ErrNoDevice or ErrNotConnected.
func (c *Conn) Disconnect(index int) error {
	fail := func(err error) error { return &Error{Op: "disconnect", Index: index, Err: err} }
	if index < 0 {
		return fail(ErrIndexRange)
	}
	b, err := encodeIndex(uint32(index))
	if err != nil {
		return fail(err)
	}
	d, err := c.Status(index)
	if err != nil {
		return fail(err)
	}
	switch {
	case len(d) == 0:
		return fail(ErrNoDevice)
	case !d[0].Connected:
		return fail(ErrNotConnected)
	}
	if _, err := c.execute(CmdDisconnect, b, netlink.Request|netlink.Acknowledge); err != nil {
		return fail(err)
	}
	return nil
}

// Reconfigure changes a connected device: replaces dead sockets, timeouts,
// client flags.
func (c *Conn) Reconfigure(cfg ReconfigureConfig) error {
	fail := func(err error) error { return &Error{Op: "reconfigure", Index: int(cfg.Index), Err: err} }
	b, err := encodeReconfigure(cfg)
	if err != nil {
		return fail(err)
	}
	if _, err := c.execute(CmdReconfigure, b, netlink.Request|netlink.Acknowledge); err != nil {
		return fail(err)
	}
	return nil
}

// Status lists the nbd devices with their connection state. With index >= 0
// it asks about that device only; a device that does not exist gives an
// empty list.
func (c *Conn) Status(index int) ([]DeviceStatus, error) {
	fail := func(err error) ([]DeviceStatus, error) {
		return nil, &Error{Op: "status", Index: index, Err: err}
	}
	var b []byte
	if index >= 0 {
		var err error
		if b, err = encodeIndex(uint32(index)); err != nil {
			return fail(err)
		}
	}
	msgs, err := c.execute(CmdStatus, b, netlink.Request)
	if err != nil {
		return fail(err)
	}
	var devs []DeviceStatus
	found := false
	for _, m := range msgs {
		if Command(m.Header.Command) != CmdStatus {
			continue
		}
		d, err := decodeStatus(m.Data)
		if err != nil {
			return fail(err)
		}
		devs = append(devs, d...)
		found = true
	}
	if !found {
		return fail(errMissingDevices)
	}
	return devs, nil
}

// Watcher receives LINK_DEAD notifications of the nbd_mc_group multicast
// group on its own netlink socket.
type Watcher struct {
	c        *genetlink.Conn
	familyID uint16
	once     sync.Once
}

// WatchLinkDead joins the nbd multicast group.
func (c *Conn) WatchLinkDead() (*Watcher, error) {
	fail := func(err error) (*Watcher, error) { return nil, &Error{Op: "watch", Index: -1, Err: err} }
	var group uint32
	found := false
	for _, g := range c.family.Groups {
		if g.Name == mcGroupName {
			group, found = g.ID, true
		}
	}
	if !found {
		return fail(fmt.Errorf("the kernel's nbd family has no %q multicast group", mcGroupName))
	}
	if c.dial == nil {
		return fail(errors.New("no way to open a second netlink socket"))
	}
	nc, err := c.dial()
	if err != nil {
		return fail(err)
	}
	if err := nc.JoinGroup(group); err != nil {
		nc.Close()
		return fail(err)
	}
	return &Watcher{c: nc, familyID: c.family.ID}, nil
}

// Next blocks until a device's connection dies and returns its index.
// After Close it returns an error.
func (w *Watcher) Next() (int, error) {
	for {
		msgs, nmsgs, err := w.c.Receive()
		if err != nil {
			return -1, &Error{Op: "watch", Index: -1, Err: err}
		}
		for i, m := range msgs {
			if nmsgs[i].Header.Type != netlink.HeaderType(w.familyID) || Command(m.Header.Command) != CmdLinkDead {
				continue
			}
			idx, err := decodeIndex(m.Data)
			if err != nil {
				continue // not ours to judge: skip a malformed notification
			}
			return int(idx), nil
		}
	}
}

// Close stops the watcher; a blocked Next returns.
func (w *Watcher) Close() error {
	var err error
	w.once.Do(func() { err = w.c.Close() })
	return err
}
