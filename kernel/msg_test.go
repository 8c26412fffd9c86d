package kernel

import (
	"errors"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

func TestDecodeStatus(t *testing.T) {
	item := func(fn func(ae *netlink.AttributeEncoder)) []byte {
		ae := netlink.NewAttributeEncoder()
		ae.Nested(attrDeviceList, func(lae *netlink.AttributeEncoder) error {
			lae.Nested(deviceItem, func(iae *netlink.AttributeEncoder) error { fn(iae); return nil })
			return nil
		})
		b, err := ae.Encode()
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	good := statusReply(DeviceStatus{0, true}, DeviceStatus{7, false})[0].Data
	tests := []struct {
		name    string
		in      []byte
		want    []DeviceStatus
		fail    bool
		wantErr error // with fail: the error, nil for any
	}{
		{"two devices", good, []DeviceStatus{{0, true}, {7, false}}, false, nil},
		{"empty list", statusReply()[0].Data, nil, false, nil},
		{"unknown attributes ignored", item(func(ae *netlink.AttributeEncoder) {
			ae.Uint32(deviceIndex, 3)
			ae.String(99, "future")
		}), []DeviceStatus{{3, false}}, false, nil},
		{"item without index", item(func(ae *netlink.AttributeEncoder) { ae.Uint8(deviceConnected, 1) }), nil, true, errBadDeviceItem},
		{"index of wrong size", item(func(ae *netlink.AttributeEncoder) { ae.Uint16(deviceIndex, 3) }), nil, true, nil},
		{"no device list", nil, nil, true, errMissingDevices},
		{"truncated", good[:len(good)-3], nil, true, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := decodeStatus(tt.in)
			if tt.fail {
				if err == nil {
					t.Fatalf("no error, got %v", got)
				}
				if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
					t.Fatalf("error %v, want %v", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

func TestDecodeIndex(t *testing.T) {
	if i, err := decodeIndex(indexReply(CmdLinkDead, 9)[0].Data); err != nil || i != 9 {
		t.Errorf("decodeIndex = %d, %v; want 9", i, err)
	}
	if _, err := decodeIndex(nil); !errors.Is(err, errMissingIndex) {
		t.Errorf("empty: error %v, want errMissingIndex", err)
	}
	if _, err := decodeIndex([]byte{5, 0, 1, 0, 7}); err == nil {
		t.Error("short index: no error")
	}
}

func FuzzDecodeStatus(f *testing.F) {
	f.Add(statusReply(DeviceStatus{0, true}, DeviceStatus{7, false})[0].Data)
	f.Add(statusReply()[0].Data)
	f.Add([]byte{8, 0, 9, 0, 4, 0, 1, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		devs, err := decodeStatus(b)
		if err == nil && len(devs) > len(b)/8 {
			t.Fatalf("%d devices from %d bytes", len(devs), len(b))
		}
	})
}

func FuzzDecodeIndex(f *testing.F) {
	f.Add(indexReply(CmdConnect, 3)[0].Data)
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _ = decodeIndex(b)
	})
}

func TestParseDevice(t *testing.T) {
	tests := []struct {
		in   string
		want int
		ok   bool
	}{
		{"/dev/nbd0", 0, true},
		{"/dev/nbd15", 15, true},
		{"nbd3", 3, true},
		{"/dev/nbd", 0, false},
		{"/dev/nbd0p1", 0, false},
		{"/dev/nbd01", 0, false},
		{"/dev/loop0", 0, false},
		{"/dev/nbd-1", 0, false},
		{"/dev/nbd99999999999", 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := ParseDevice(tt.in)
			if (err == nil) != tt.ok || got != tt.want {
				t.Errorf("ParseDevice(%q) = %d, %v", tt.in, got, err)
			}
		})
	}
}

func TestMaxIndex(t *testing.T) {
	// max_part as shown in /sys/module/nbd/parameters (already rounded by
	// nbd_init) → MINORMASK >> fls(max_part).
	tests := []struct {
		maxPart string
		want    int
		ok      bool
	}{
		{"0", 1<<20 - 1, true},
		{"15", 1<<16 - 1, true},
		{"31", 1<<15 - 1, true}, // the default max_part=16 becomes 31
		{"x", 0, false},
		{"-1", 0, false},
	}
	for _, tt := range tests {
		got, ok := maxIndexFor(tt.maxPart)
		if got != tt.want || ok != tt.ok {
			t.Errorf("maxIndexFor(%q) = %d, %v; want %d, %v", tt.maxPart, got, ok, tt.want, tt.ok)
		}
	}
}

func TestModuleFlags(t *testing.T) {
	tests := []struct {
		path string
		want int
	}{
		{"/lib/modules/6.1.0-56-cloud-amd64/kernel/drivers/block/nbd.ko", 0},
		{"/lib/modules/6.12.48+deb13-amd64/kernel/drivers/block/nbd.ko.xz", unix.MODULE_INIT_COMPRESSED_FILE},
		{"/lib/modules/x/kernel/drivers/block/nbd.ko.zst", unix.MODULE_INIT_COMPRESSED_FILE},
		{"/lib/modules/x/kernel/drivers/block/nbd.ko.gz", unix.MODULE_INIT_COMPRESSED_FILE},
	}
	for _, tt := range tests {
		if got := moduleFlags(tt.path); got != tt.want {
			t.Errorf("moduleFlags(%q) = %d, want %d", tt.path, got, tt.want)
		}
	}
}
