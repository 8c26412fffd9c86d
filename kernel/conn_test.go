package kernel

import (
	"encoding/binary"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/genetlink/genltest"
	"github.com/mdlayher/netlink"
	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
	"golang.org/x/sys/unix"
)

var fakeFamily = genetlink.Family{
	ID:      0x21,
	Version: familyVer,
	Name:    familyName,
	Groups:  []genetlink.MulticastGroup{{ID: 7, Name: mcGroupName}},
}

// attr is a decoded attribute tree, for comparing requests.
type attr struct {
	Type   uint16
	Data   []byte
	Nested []attr
}

// tree decodes b as attributes, descending into the ones marked nested.
func tree(t *testing.T, b []byte, nested func(path []uint16) bool, path []uint16) []attr {
	t.Helper()
	as, err := netlink.UnmarshalAttributes(b)
	if err != nil {
		t.Fatalf("unmarshal attributes: %v", err)
	}
	var out []attr
	for _, a := range as {
		p := append(append([]uint16(nil), path...), a.Type&^unix.NLA_F_NESTED)
		if nested(p) {
			out = append(out, attr{Type: a.Type, Nested: tree(t, a.Data, nested, p)})
			continue
		}
		out = append(out, attr{Type: a.Type, Data: a.Data})
	}
	return out
}

func u32(v uint32) []byte { b := make([]byte, 4); binary.NativeEndian.PutUint32(b, v); return b }
func u64(v uint64) []byte { b := make([]byte, 8); binary.NativeEndian.PutUint64(b, v); return b }
func str(s string) []byte { return append([]byte(s), 0) }

// socketsNested marks NBD_ATTR_SOCKETS and its SOCK_ITEMs as nested.
func socketsNested(p []uint16) bool {
	return p[0] == attrSockets && len(p) <= 2
}

func sockets(fds ...uint32) attr {
	// mdlayher/netlink marks nested attributes with NLA_F_NESTED; the
	// kernel's nla_type() masks the flag off.
	a := attr{Type: attrSockets | unix.NLA_F_NESTED}
	for _, fd := range fds {
		a.Nested = append(a.Nested, attr{Type: sockItem | unix.NLA_F_NESTED, Nested: []attr{{Type: sockFD, Data: u32(fd)}}})
	}
	return a
}

// fakeConn serves the nbd family with fn.
func fakeConn(t *testing.T, fn genltest.Func) *Conn {
	t.Helper()
	gc := genltest.Dial(genltest.ServeFamily(fakeFamily, fn))
	c, err := newConn(gc, nil, func() error { t.Fatal("unexpected module load"); return nil })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func indexReply(cmd Command, index uint32) []genetlink.Message {
	ae := netlink.NewAttributeEncoder()
	ae.Uint32(attrIndex, index)
	b, _ := ae.Encode()
	return []genetlink.Message{{Header: genetlink.Header{Command: uint8(cmd), Version: familyVer}, Data: b}}
}

func TestConnect(t *testing.T) {
	tests := []struct {
		name      string
		cfg       ConnectConfig
		want      []attr
		reply     uint32
		wantIndex int
	}{
		{
			name: "all attributes",
			cfg: ConnectConfig{
				Index: 3, Size: 1 << 30, BlockSize: 4096,
				ServerFlags: uint64(nbdproto.FlagHasFlags | nbdproto.FlagReadOnly | nbdproto.FlagCanMultiConn),
				ClientFlags: ClientDestroyOnDisconnect,
				Timeout:     1500 * time.Millisecond, DeadConnTimeout: 30 * time.Second,
				Sockets:           []int{5, 9},
				BackendIdentifier: "nbdgw:/img/disk.qcow2",
			},
			want: []attr{
				{Type: attrIndex, Data: u32(3)},
				{Type: attrSizeBytes, Data: u64(1 << 30)},
				{Type: attrBlockSizeBytes, Data: u64(4096)},
				{Type: attrServerFlags, Data: u64(uint64(nbdproto.FlagHasFlags | nbdproto.FlagReadOnly | nbdproto.FlagCanMultiConn))},
				{Type: attrClientFlags, Data: u64(ClientDestroyOnDisconnect)},
				{Type: attrTimeout, Data: u64(2)},
				{Type: attrDeadConnTimeout, Data: u64(30)},
				sockets(5, 9),
				{Type: attrBackendIdentifier, Data: str("nbdgw:/img/disk.qcow2")},
			},
			reply:     3,
			wantIndex: 3,
		},
		{
			name: "kernel picks the device",
			cfg:  ConnectConfig{Index: AnyIndex, Size: 512, ServerFlags: uint64(nbdproto.FlagHasFlags), Sockets: []int{4}},
			want: []attr{
				{Type: attrSizeBytes, Data: u64(512)},
				{Type: attrServerFlags, Data: u64(uint64(nbdproto.FlagHasFlags))},
				sockets(4),
			},
			reply:     11,
			wantIndex: 11,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := fakeConn(t, genltest.CheckRequest(fakeFamily.ID, uint8(CmdConnect), netlink.Request,
				func(greq genetlink.Message, _ netlink.Message) ([]genetlink.Message, error) {
					if greq.Header.Version != familyVer {
						t.Errorf("version %d, want %d", greq.Header.Version, familyVer)
					}
					got := tree(t, greq.Data, socketsNested, nil)
					if diff := cmp.Diff(tt.want, got); diff != "" {
						t.Errorf("CONNECT attributes (-want +got):\n%s", diff)
					}
					return indexReply(CmdConnect, tt.reply), nil
				}))
			idx, err := c.Connect(tt.cfg)
			if err != nil {
				t.Fatal(err)
			}
			if idx != tt.wantIndex {
				t.Errorf("index %d, want %d", idx, tt.wantIndex)
			}
		})
	}
}

func TestConnectErrors(t *testing.T) {
	tests := []struct {
		name     string
		cfg      ConnectConfig
		errno    unix.Errno // kernel answer; 0: request must not be sent
		wantIs   []error
		wantText string
	}{
		{"busy", ConnectConfig{Index: 0, Size: 512, Sockets: []int{3}}, unix.EBUSY, []error{ErrBusy, unix.EBUSY}, "/dev/nbd0: device is busy"},
		{"refused", ConnectConfig{Index: AnyIndex, Size: 512, Sockets: []int{3}}, unix.EINVAL, []error{unix.EINVAL}, "refused"},
		{"no sockets", ConnectConfig{Index: AnyIndex, Size: 512}, 0, []error{errNoSockets}, "no sockets"},
		{"zero size", ConnectConfig{Index: AnyIndex, Sockets: []int{3}}, 0, []error{errZeroSize}, "size is zero"},
		{"bad fd", ConnectConfig{Index: AnyIndex, Size: 512, Sockets: []int{-2}}, 0, []error{errBadSocket}, "negative"},
		{"too many sockets", ConnectConfig{Index: AnyIndex, Size: 512, Sockets: make([]int, maxSockets+1)}, 0, []error{errTooManySockets}, "sockets"},
		{"NUL in backend", ConnectConfig{Index: AnyIndex, Size: 512, Sockets: []int{3}, BackendIdentifier: "a\x00b"}, 0, []error{errBackendNUL}, "NUL"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := fakeConn(t, func(genetlink.Message, netlink.Message) ([]genetlink.Message, error) {
				if tt.errno == 0 {
					t.Error("request sent")
					return nil, genltest.Error(int(unix.EIO))
				}
				return nil, genltest.Error(int(tt.errno))
			})
			_, err := c.Connect(tt.cfg)
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range tt.wantIs {
				if !errors.Is(err, w) {
					t.Errorf("error %q is not %v", err, w)
				}
			}
			var ke *Error
			if !errors.As(err, &ke) || ke.Op != "connect" {
				t.Errorf("error %#v is not a connect *Error", err)
			}
			if !strings.Contains(err.Error(), tt.wantText) {
				t.Errorf("error %q does not mention %q", err, tt.wantText)
			}
		})
	}
}

func TestReconfigure(t *testing.T) {
	flags := uint64(0)
	c := fakeConn(t, genltest.CheckRequest(fakeFamily.ID, uint8(CmdReconfigure), netlink.Request|netlink.Acknowledge,
		func(greq genetlink.Message, _ netlink.Message) ([]genetlink.Message, error) {
			want := []attr{
				{Type: attrIndex, Data: u32(2)},
				{Type: attrDeadConnTimeout, Data: u64(10)},
				{Type: attrClientFlags, Data: u64(0)},
				sockets(12),
				{Type: attrBackendIdentifier, Data: str("nbdgw:x")},
			}
			if diff := cmp.Diff(want, tree(t, greq.Data, socketsNested, nil)); diff != "" {
				t.Errorf("RECONFIGURE attributes (-want +got):\n%s", diff)
			}
			return nil, io.EOF // an acknowledgement
		}))
	err := c.Reconfigure(ReconfigureConfig{Index: 2, Sockets: []int{12}, DeadConnTimeout: 10 * time.Second, ClientFlags: &flags, BackendIdentifier: "nbdgw:x"})
	if err != nil {
		t.Fatal(err)
	}
}

// statusReply encodes a STATUS reply the way the kernel's
// populate_nbd_status does.
func statusReply(devs ...DeviceStatus) []genetlink.Message {
	ae := netlink.NewAttributeEncoder()
	ae.Nested(attrDeviceList, func(nae *netlink.AttributeEncoder) error {
		for _, d := range devs {
			nae.Nested(deviceItem, func(iae *netlink.AttributeEncoder) error {
				iae.Uint32(deviceIndex, d.Index)
				c := uint8(0)
				if d.Connected {
					c = 1
				}
				iae.Uint8(deviceConnected, c)
				return nil
			})
		}
		return nil
	})
	b, _ := ae.Encode()
	return []genetlink.Message{{Header: genetlink.Header{Command: uint8(CmdStatus), Version: familyVer}, Data: b}}
}

func TestStatus(t *testing.T) {
	all := []DeviceStatus{{0, true}, {1, false}, {15, true}}
	tests := []struct {
		name  string
		index int
		want  []DeviceStatus
	}{
		{"all", -1, all},
		{"one", 1, all[1:2]},
		{"missing", 40, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := fakeConn(t, genltest.CheckRequest(fakeFamily.ID, uint8(CmdStatus), netlink.Request,
				func(greq genetlink.Message, _ netlink.Message) ([]genetlink.Message, error) {
					if tt.index < 0 {
						if len(greq.Data) != 0 {
							t.Errorf("STATUS of all devices carries attributes %x", greq.Data)
						}
						return statusReply(all...), nil
					}
					idx, err := decodeIndex(greq.Data)
					if err != nil {
						t.Fatal(err)
					}
					for _, d := range all {
						if d.Index == idx {
							return statusReply(d), nil
						}
					}
					return statusReply(), nil
				}))
			got, err := c.Status(tt.index)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("status (-want +got):\n%s", diff)
			}
		})
	}
}

func TestDisconnect(t *testing.T) {
	tests := []struct {
		name     string
		devs     []DeviceStatus // what STATUS says
		errno    unix.Errno     // what DISCONNECT says
		wantSent bool
		wantIs   error
	}{
		{"ok", []DeviceStatus{{2, true}}, 0, true, nil},
		{"not connected", []DeviceStatus{{2, false}}, 0, false, ErrNotConnected},
		{"no device", nil, 0, false, ErrNoDevice},
		{"denied", []DeviceStatus{{2, true}}, unix.EPERM, true, unix.EPERM},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sent := false
			c := fakeConn(t, func(greq genetlink.Message, nreq netlink.Message) ([]genetlink.Message, error) {
				switch Command(greq.Header.Command) {
				case CmdStatus:
					return statusReply(tt.devs...), nil
				case CmdDisconnect:
					sent = true
					if nreq.Header.Flags != netlink.Request|netlink.Acknowledge {
						t.Errorf("flags %v", nreq.Header.Flags)
					}
					if diff := cmp.Diff([]attr{{Type: attrIndex, Data: u32(2)}}, tree(t, greq.Data, func([]uint16) bool { return false }, nil)); diff != "" {
						t.Errorf("DISCONNECT attributes (-want +got):\n%s", diff)
					}
					if tt.errno != 0 {
						return nil, genltest.Error(int(tt.errno))
					}
					return nil, io.EOF // an acknowledgement
				}
				t.Errorf("unexpected command %v", Command(greq.Header.Command))
				return nil, genltest.Error(int(unix.EOPNOTSUPP))
			})
			err := c.Disconnect(2)
			if sent != tt.wantSent {
				t.Errorf("DISCONNECT sent: %v, want %v", sent, tt.wantSent)
			}
			if tt.wantIs == nil {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if !errors.Is(err, tt.wantIs) {
				t.Errorf("error %v is not %v", err, tt.wantIs)
			}
		})
	}
}

func TestOpenLoadsModule(t *testing.T) {
	registered := false
	loads := 0
	gc := genltest.Dial(func(greq genetlink.Message, nreq netlink.Message) ([]genetlink.Message, error) {
		if nreq.Header.Type == unix.GENL_ID_CTRL && greq.Header.Command == unix.CTRL_CMD_GETFAMILY && !registered {
			return nil, genltest.Error(int(unix.ENOENT))
		}
		return genltest.ServeFamily(fakeFamily, nil)(greq, nreq)
	})
	c, err := newConn(gc, nil, func() error { loads++; registered = true; return nil })
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if loads != 1 {
		t.Errorf("module loaded %d times, want 1", loads)
	}
	if diff := cmp.Diff(fakeFamily, c.family); diff != "" {
		t.Errorf("family (-want +got):\n%s", diff)
	}
}

func TestOpenNoNBD(t *testing.T) {
	noFamily := func(genetlink.Message, netlink.Message) ([]genetlink.Message, error) {
		return nil, genltest.Error(int(unix.ENOENT))
	}
	release := kernelRelease()
	tests := []struct {
		name  string
		files map[string]string // under root/<release>/
	}{
		{"no module index", nil},
		{"no nbd module", map[string]string{"modules.dep": "kernel/drivers/block/loop.ko:\n", "modules.alias": "", "modules.builtin": ""}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			for name, content := range tt.files {
				p := filepath.Join(root, release, name)
				if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			_, err := newConn(genltest.Dial(noFamily), nil, func() error { return loadModule(root) })
			if !errors.Is(err, ErrNotSupported) {
				t.Fatalf("error %v is not ErrNotSupported", err)
			}
			if !strings.Contains(err.Error(), "no nbd support") || !strings.Contains(err.Error(), release) {
				t.Errorf("error %q does not say that kernel %s has no nbd support", err, release)
			}
		})
	}
}

// TestOpenHostWithoutNBD runs against the real kernel when it has no nbd
// driver at all (as on the development machine): Open must say so.
func TestOpenHostWithoutNBD(t *testing.T) {
	gc, err := genetlink.Dial(nil)
	if err != nil {
		t.Skipf("no generic netlink: %v", err)
	}
	_, ferr := gc.GetFamily(familyName)
	gc.Close()
	if ferr == nil {
		t.Skip("the running kernel has the nbd family")
	}
	mods, _ := filepath.Glob(filepath.Join("/lib/modules", kernelRelease(), "kernel/drivers/block/nbd.ko*"))
	if len(mods) > 0 {
		t.Skipf("the running kernel has a loadable nbd module (%s); not loading it from a unit test", mods[0])
	}
	c, err := Open(Options{})
	if err == nil {
		c.Close()
		t.Fatal("Open succeeded on a kernel without nbd")
	}
	if !errors.Is(err, ErrNotSupported) || !strings.Contains(err.Error(), "no nbd support") {
		t.Fatalf("error %q does not say the kernel has no nbd support", err)
	}
	t.Logf("Open: %v", err)
}

func TestWatcher(t *testing.T) {
	// The fake socket hands out these notifications, one per Receive.
	notes := [][]genetlink.Message{
		statusReply(DeviceStatus{1, true}), // other command: ignored
		indexReply(CmdLinkDead, 4),
	}
	gc := genltest.Dial(func(greq genetlink.Message, nreq netlink.Message) ([]genetlink.Message, error) {
		if len(notes) == 0 {
			return nil, errors.New("socket closed")
		}
		m := notes[0]
		notes = notes[1:]
		return m, nil
	})
	w := &Watcher{c: gc, familyID: 0} // nltest replies carry header type 0
	idx, err := w.Next()
	if err != nil {
		t.Fatal(err)
	}
	if idx != 4 {
		t.Errorf("LINK_DEAD index %d, want 4", idx)
	}
	if _, err := w.Next(); err == nil {
		t.Error("Next after the end: no error")
	}
	w.Close()
}
