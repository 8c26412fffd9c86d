package kernel

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/pmorjan/kmod"
	"golang.org/x/sys/unix"
)

// loadModule loads the nbd module found under root (normally
// /lib/modules) with github.com/pmorjan/kmod. The returned error explains
// why nbd cannot be had; it wraps ErrNotSupported when the kernel has no
// loadable nbd module at all.
func loadModule(root string) error {
	release := kernelRelease()
	dir := filepath.Join(root, release)
	k, err := kmod.New(kmod.SetRootDir(root))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("%w: the generic netlink family %q is not registered and there is no module index %s to load the nbd module from (kernel %s)",
				ErrNotSupported, familyName, filepath.Join(dir, "modules.dep"), release)
		}
		return fmt.Errorf("loading the nbd module: %w", err)
	}
	err = k.Load(moduleName, "", 0)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, kmod.ErrModuleNotFound):
		return fmt.Errorf("%w: the generic netlink family %q is not registered and kernel %s has no nbd module in %s",
			ErrNotSupported, familyName, release, dir)
	case errors.Is(err, unix.EPERM):
		return fmt.Errorf("loading the nbd module: %w (need root, or module loading is disabled: run 'modprobe nbd' first)", err)
	}
	return fmt.Errorf("loading the nbd module: %w", err)
}

func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "unknown"
	}
	return unix.ByteSliceToString(u.Release[:])
}
