package nbdserver

import "sync"

// memBudget bounds the bytes of request buffers held across all
// connections. Each connection draws on it through a connBudget, which
// bounds the connection's own total and holds a floor of its own: the
// first connFloor bytes a connection holds do not come from the shared
// pool, so a connection can always take a small request even when
// stalled clients hold the whole pool. Waiting is not first come, first
// served: whenever bytes are released, every waiter whose request now
// fits proceeds, so a small request never queues behind a large one
// that does not fit yet. The bytes held server-wide are at most the
// pool's limit plus connFloor per connection.
type memBudget struct {
	mu    sync.Mutex
	cond  sync.Cond
	limit int64 // bytes of the shared pool
	used  int64
}

func newMemBudget(limit int64) *memBudget {
	b := &memBudget{limit: limit}
	b.cond.L = &b.mu
	return b
}

// connBudget is one connection's share of a memBudget.
type connBudget struct {
	pool         *memBudget
	limit, floor int64
	used         int64 // guarded by pool.mu
}

func (b *memBudget) conn(limit, floor int64) *connBudget {
	return &connBudget{pool: b, limit: limit, floor: min(floor, limit)}
}

// over is how many of used bytes exceed floor.
func over(used, floor int64) int64 { return max(0, used-floor) }

// acquire waits until n bytes fit within the connection's limit and the
// pool (beyond the floor) and takes them. n is clipped to what could
// ever fit (the connection's limit, its floor plus the pool); acquire
// returns the bytes taken, for release.
func (c *connBudget) acquire(n int64) int64 {
	n = min(n, c.limit, c.floor+c.pool.limit)
	if n <= 0 {
		return 0
	}
	p := c.pool
	p.mu.Lock()
	defer p.mu.Unlock()
	for {
		shared := over(c.used+n, c.floor) - over(c.used, c.floor)
		if c.used+n <= c.limit && p.used+shared <= p.limit {
			c.used += n
			p.used += shared
			return n
		}
		p.cond.Wait()
	}
}

// release gives back n bytes taken by acquire.
func (c *connBudget) release(n int64) {
	if n <= 0 {
		return
	}
	p := c.pool
	p.mu.Lock()
	p.used -= over(c.used, c.floor) - over(c.used-n, c.floor)
	c.used -= n
	p.mu.Unlock()
	p.cond.Broadcast()
}
