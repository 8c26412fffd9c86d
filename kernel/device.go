package kernel

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// DevicePath returns /dev/nbdN for index N.
func DevicePath(index int) string {
	return devicePrefix + strconv.Itoa(index)
}

// ParseDevice returns N for "/dev/nbdN" (also accepted: "nbdN").
func ParseDevice(s string) (int, error) {
	name := strings.TrimPrefix(s, "/dev/")
	num, ok := strings.CutPrefix(name, "nbd")
	if !ok || num == "" || (len(num) > 1 && num[0] == '0') {
		return 0, fmt.Errorf("%q is not an nbd device (want /dev/nbdN)", s)
	}
	for _, c := range num {
		if c < '0' || c > '9' {
			return 0, fmt.Errorf("%q is not an nbd device (want /dev/nbdN; partitions like nbd0p1 cannot be attached)", s)
		}
	}
	n, err := strconv.ParseUint(num, 10, 31)
	if err != nil {
		return 0, fmt.Errorf("%q: %w", s, ErrIndexRange)
	}
	return int(n), nil
}

// sysfsRoot is where block devices and module parameters are found.
const sysfsRoot = "/sys"

// MaxIndex returns the largest device number the loaded driver accepts:
// the kernel shifts the index by the partition bits and requires the
// first minor to fit in 20 bits (nbd_genl_connect: index >
// MINORMASK >> part_shift is EINVAL). ok is false when the module
// parameters cannot be read.
func MaxIndex() (max int, ok bool) {
	b, err := os.ReadFile(filepath.Join(sysfsRoot, "module/nbd/parameters/max_part"))
	if err != nil {
		return 0, false
	}
	return maxIndexFor(strings.TrimSpace(string(b)))
}

func maxIndexFor(maxPart string) (int, bool) {
	mp, err := strconv.Atoi(maxPart)
	if err != nil || mp < 0 {
		return 0, false
	}
	// nbd_init: part_shift = fls(max_part) and max_part is rounded up to
	// (1 << part_shift) - 1; the module parameter shows the rounded value.
	shift := 0
	for v := mp; v > 0; v >>= 1 {
		shift++
	}
	const minorMask = 1<<20 - 1
	return minorMask >> shift, true
}

// Info is what sysfs tells about one device, beyond STATUS.
type Info struct {
	// Size in bytes (0 when disconnected).
	Size int64
	// PID of the process that connected the device (0: none).
	PID int
	// Thread is the thread that sent CONNECT, as the kernel records it in
	// /sys/block/nbdN/pid (it equals PID in a single-threaded client).
	Thread int
	// Backend is NBD_ATTR_BACKEND_IDENTIFIER as given to CONNECT.
	Backend string
	// ReadOnly reports the block device's read-only flag.
	ReadOnly bool
}

// DeviceInfo reads /sys/block/nbdN. Missing files leave zero values: the
// pid and backend files only exist while the device is connected.
func DeviceInfo(index int) Info {
	in := deviceInfo(index)
	in.Thread = in.PID
	if in.PID > 0 {
		in.PID = threadGroup(in.PID)
	}
	return in
}

// threadGroup returns the process a thread belongs to (itself when /proc
// cannot tell, e.g. after the thread exited).
func threadGroup(tid int) int {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(tid), "status"))
	if err != nil {
		return tid
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "Tgid:"); ok {
			if p, err := strconv.Atoi(strings.TrimSpace(v)); err == nil && p > 0 {
				return p
			}
		}
	}
	return tid
}

// deviceInfo is DeviceInfo with the raw thread id in PID.
func deviceInfo(index int) Info {
	dir := filepath.Join(sysfsRoot, "block", "nbd"+strconv.Itoa(index))
	read := func(name string) string {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return ""
		}
		return strings.TrimSpace(string(b))
	}
	var in Info
	if s, err := strconv.ParseInt(read("size"), 10, 64); err == nil && s > 0 && s < 1<<54 {
		in.Size = s * 512
	}
	if p, err := strconv.Atoi(read("pid")); err == nil {
		in.PID = p
	}
	in.Backend = read("backend")
	in.ReadOnly = read("ro") == "1"
	return in
}
