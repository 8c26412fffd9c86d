package integration

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/nbdgw/nbdgw/nbdserver/nbdclient"
)

// TestHardeningLoad: 32 concurrent clients x 1000 mixed requests (reads
// of 1 byte to 1 MiB at any offset, block status of random ranges on
// every context) against `nbdgw serve`, every answer checked against
// qemu-img convert and qemu-nbd; zero errors allowed. It reports
// throughput and latency percentiles. NBDGW_LOAD_CLIENTS and
// NBDGW_LOAD_REQUESTS change the size (scripts/check.sh runs the full
// size; -short runs 32 x 100).
func TestHardeningLoad(t *testing.T) {
	t.Parallel()
	hardRequire(t, "qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")
	clients, requests := 32, 1000
	if testing.Short() {
		requests = 100
	}
	if v, err := strconv.Atoi(os.Getenv("NBDGW_LOAD_CLIENTS")); err == nil && v > 0 {
		clients = v
	}
	if v, err := strconv.Atoi(os.Getenv("NBDGW_LOAD_REQUESTS")); err == nil && v > 0 {
		requests = v
	}
	bin := nbdgwBinary(t)
	top, _ := hardChain(t, t.TempDir())
	o := hardQemuOracle(t, top, "b0")
	s, r := hardServe(t, bin, top)
	if s == nil {
		t.Fatal(r)
	}

	type result struct {
		lat   []time.Duration
		bytes int64
		err   error
	}
	results := make([]result, clients)
	var wg sync.WaitGroup
	start := time.Now()
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			opts := nbdclient.Options{StructuredReplies: true, MetaContexts: hardAllContexts}
			if i%2 == 0 {
				opts.ExtendedHeaders = true
			}
			ctx := context.Background()
			c, err := nbdclient.Dial(ctx, s.uri, opts)
			if err != nil {
				results[i].err = err
				return
			}
			defer c.Close()
			rng := rand.New(rand.NewPCG(uint64(i), 42))
			buf := make([]byte, 1<<20)
			res := &results[i]
			for k := 0; k < requests; k++ {
				// Every context in turn, and reads in between.
				var ctxs []string
				if k%2 == 1 {
					ctxs = []string{hardAllContexts[(k/2)%len(hardAllContexts)]}
				}
				t0 := time.Now()
				n, err := hardLoadRequest(ctx, c, o, rng, buf, ctxs)
				res.lat = append(res.lat, time.Since(t0))
				res.bytes += n
				if err != nil {
					res.err = fmt.Errorf("client %d request %d: %w", i, k, err)
					return
				}
			}
		}(i)
	}
	wg.Wait()
	elapsed := time.Since(start)
	var all []time.Duration
	var total int64
	errs := 0
	for _, r := range results {
		all = append(all, r.lat...)
		total += r.bytes
		if r.err != nil {
			errs++
			t.Error(r.err)
		}
	}
	slices.Sort(all)
	pct := func(p float64) time.Duration {
		if len(all) == 0 {
			return 0
		}
		return all[min(len(all)-1, int(float64(len(all))*p))]
	}
	summary := fmt.Sprintf("load: %d clients x %d requests = %d done, %d client errors, %v: %.0f req/s, %.1f MiB/s read; latency p50 %v p99 %v max %v",
		clients, requests, len(all), errs, elapsed.Round(time.Millisecond), float64(len(all))/elapsed.Seconds(),
		float64(total)/elapsed.Seconds()/(1<<20), pct(0.50).Round(time.Microsecond), pct(0.99).Round(time.Microsecond), pct(1).Round(time.Microsecond))
	t.Log(summary)
	if f := os.Getenv("NBDGW_LOAD_REPORT"); f != "" {
		os.WriteFile(f, []byte(summary+"\n"), 0o644)
	}
	if len(all) != clients*requests {
		t.Errorf("%d requests answered, want %d", len(all), clients*requests)
	}
	r = s.stop(t)
	hardSaneLimit(t, r, 1<<30)
	t.Logf("server peak RSS %d MiB", r.rss>>20)
	if r.code != 0 {
		t.Errorf("serve after SIGTERM: %s", r)
	}
}

// hardLoadRequest sends one request: with no context a read (mostly
// up to 64 KiB, one in four up to 1 MiB, at any byte offset), else block
// status of a random range of the context. It returns the bytes read.
func hardLoadRequest(ctx context.Context, c *nbdclient.Client, o *hardOracle, rng *rand.Rand, buf []byte, contexts []string) (int64, error) {
	size := int64(len(o.data))
	if len(contexts) == 0 {
		n := 1 + rng.Int64N(64<<10)
		if rng.IntN(4) == 0 {
			n = 1 + rng.Int64N(int64(len(buf)))
		}
		off := rng.Int64N(size - n + 1)
		return n, hardCheckedRead(c, o, off, buf[:n])
	}
	off := rng.Int64N(size)
	return 0, hardCheckedStatus(ctx, c, o, contexts[0], off, 1+rng.Int64N(size-off))
}
