// Command nbdhostile attacks an NBD server with misbehaving clients
// (package internal/hostile: bad handshakes, oversize and malformed
// requests, unknown commands and flags, writes, abrupt closes mid-reply,
// connections dropped with requests in flight) and slow readers that
// never drain their replies, while well-behaved clients keep reading and
// mapping. It fails (exit 1) if a well-behaved client sees an error or
// wrong data, or if the server stops accepting connections.
//
//	nbdhostile [-rounds N] [-parallel P] [-slow K] [-good G]
//	           [-verify RAW] [-contexts base:allocation,...] NBD-URI
//
// With -verify, every read is compared with the same bytes of RAW (for
// example what qemu-img convert -O raw made of the served image). Works
// against any server, nbdgw serve or qemu-nbd; plaintext only.
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nbdgw/nbdgw/internal/hostile"
	"github.com/nbdgw/nbdgw/nbdserver/nbdclient"
	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
)

func main() {
	rounds := flag.Int("rounds", 10, "times each hostile session is played by each worker")
	parallel := flag.Int("parallel", 8, "hostile workers")
	slow := flag.Int("slow", 2, "slow readers held open during the attack")
	good := flag.Int("good", 4, "well-behaved clients")
	verify := flag.String("verify", "", "raw file with the export's content, to check reads against")
	contexts := flag.String("contexts", "base:allocation", "metadata contexts to negotiate, comma-separated")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: nbdhostile [flags] NBD-URI")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 1 {
		flag.Usage()
		os.Exit(2)
	}
	if err := run(flag.Arg(0), *rounds, *parallel, *slow, *good, *verify, strings.Split(*contexts, ",")); err != nil {
		fmt.Fprintln(os.Stderr, "nbdhostile:", err)
		os.Exit(1)
	}
}

func run(uri string, rounds, parallel, slow, good int, verify string, contexts []string) error {
	u, err := nbdproto.ParseURI(uri)
	if err != nil {
		return err
	}
	if u.TLS {
		return errors.New("TLS URIs are not supported: the hostile sessions speak plaintext")
	}
	ctx := context.Background()
	probe, err := nbdclient.Dial(ctx, uri, nbdclient.Options{StructuredReplies: true, MetaContexts: contexts})
	if err != nil {
		return fmt.Errorf("first connection: %w", err)
	}
	size := probe.Size()
	probe.Close()
	var want []byte
	if verify != "" {
		if want, err = os.ReadFile(verify); err != nil {
			return err
		}
		if int64(len(want)) < size {
			return fmt.Errorf("%s has %d bytes, the export %d", verify, len(want), size)
		}
	}

	// Well-behaved clients, until the attack is over.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var goodReqs atomic.Int64
	var goodErr error
	var errOnce sync.Once
	for i := 0; i < good; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			if err := goodClient(ctx, uri, contexts, size, want, uint64(i), stop, &goodReqs); err != nil {
				errOnce.Do(func() { goodErr = fmt.Errorf("good client %d: %w", i, err) })
			}
		}(i)
	}

	var held []net.Conn
	for i := 0; i < slow; i++ {
		c, err := hostile.Stall(u.Network, u.Address, 64, uint64(min(size, 32<<20)))
		if err != nil {
			return fmt.Errorf("slow reader %d: %w", i, err)
		}
		held = append(held, c)
	}

	sessions := hostile.Sessions(size, contexts)
	start := time.Now()
	var played, failed atomic.Int64
	var hw sync.WaitGroup
	for w := 0; w < parallel; w++ {
		hw.Add(1)
		go func() {
			defer hw.Done()
			for r := 0; r < rounds; r++ {
				for _, s := range sessions {
					if err := hostile.Play(u.Network, u.Address, s, 300*time.Millisecond); err != nil {
						failed.Add(1)
						fmt.Fprintln(os.Stderr, "nbdhostile:", err)
					}
					played.Add(1)
				}
			}
		}()
	}
	hw.Wait()
	for _, c := range held {
		c.Close()
	}
	close(stop)
	wg.Wait()
	fmt.Printf("%d hostile sessions (%d kinds) in %v, %d could not connect or negotiate; %d slow readers; %d good requests, all correct: %v\n",
		played.Load(), len(sessions), time.Since(start).Round(time.Millisecond), failed.Load(), slow, goodReqs.Load(), goodErr == nil)
	if goodErr != nil {
		return goodErr
	}
	if failed.Load() > 0 {
		return fmt.Errorf("%d sessions could not connect or negotiate", failed.Load())
	}
	// Still serving.
	c, err := nbdclient.Dial(ctx, uri, nbdclient.Options{StructuredReplies: true})
	if err != nil {
		return fmt.Errorf("after the attack: %w", err)
	}
	return c.Close()
}

// goodClient reads random ranges (checking them against want if given)
// and asks block status on every context until stop is closed.
func goodClient(ctx context.Context, uri string, contexts []string, size int64, want []byte, seed uint64, stop <-chan struct{}, n *atomic.Int64) error {
	c, err := nbdclient.Dial(ctx, uri, nbdclient.Options{StructuredReplies: true, ExtendedHeaders: seed%2 == 1, MetaContexts: contexts})
	if err != nil {
		return err
	}
	defer c.Close()
	rng := rand.New(rand.NewPCG(seed, 5))
	buf := make([]byte, 1<<20)
	for k := 0; ; k++ {
		select {
		case <-stop:
			return nil
		default:
		}
		if k%2 == 0 {
			l := 1 + rng.Int64N(min(size, int64(len(buf))))
			off := rng.Int64N(size - l + 1)
			if _, err := c.ReadAt(buf[:l], off); err != nil {
				return fmt.Errorf("read %d at %d: %w", l, off, err)
			}
			if want != nil && !bytes.Equal(buf[:l], want[off:off+l]) {
				return fmt.Errorf("read %d at %d: wrong data", l, off)
			}
		} else {
			name := contexts[k/2%len(contexts)]
			off := rng.Int64N(size)
			next := off
			err := c.BlockStatus(ctx, name, off, size-off, func(eo, en int64, _ uint32) error {
				if eo != next || en <= 0 {
					return fmt.Errorf("extent at %d+%d, want one at %d", eo, en, next)
				}
				next = eo + en
				return nil
			})
			if err != nil {
				return fmt.Errorf("block status %s at %d: %w", name, off, err)
			}
		}
		n.Add(1)
	}
}
