//go:build !cgo

package gnutlspsk

import "net"

func available() error { return ErrNoCgo }

// Server is not available without cgo.
func (k *Keys) Server(net.Conn) (net.Conn, error) { return nil, ErrNoCgo }

// Client is not available without cgo.
func Client(net.Conn, string, []byte) (net.Conn, error) { return nil, ErrNoCgo }
