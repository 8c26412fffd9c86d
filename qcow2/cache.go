package qcow2

import (
	"container/list"
	"sync"
)

// lru is a byte-budgeted least-recently-used cache of immutable byte slices.
// Values handed out must not be modified.
type lru[K comparable] struct {
	mu     sync.Mutex // guards ll, items, used
	ll     *list.List // front = most recent; elements hold *lruEntry[K]
	items  map[K]*list.Element
	used   int64
	budget int64
}

type lruEntry[K comparable] struct {
	key K
	val []byte
}

func newLRU[K comparable](budget int64) *lru[K] {
	return &lru[K]{ll: list.New(), items: make(map[K]*list.Element), budget: budget}
}

func (c *lru[K]) get(k K) ([]byte, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.items[k]; ok {
		c.ll.MoveToFront(e)
		return e.Value.(*lruEntry[K]).val, true
	}
	return nil, false
}

// put stores (or replaces) v, evicting the least recently used entries beyond the budget
// (the newest entry always stays, so one oversized value still caches).
func (c *lru[K]) put(k K, v []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.items[k]; ok {
		ent := e.Value.(*lruEntry[K])
		c.used += int64(len(v)) - int64(len(ent.val))
		ent.val = v
		c.ll.MoveToFront(e)
		return
	}
	c.items[k] = c.ll.PushFront(&lruEntry[K]{k, v})
	c.used += int64(len(v))
	for c.used > c.budget && c.ll.Len() > 1 {
		e := c.ll.Back()
		ent := e.Value.(*lruEntry[K])
		c.ll.Remove(e)
		delete(c.items, ent.key)
		c.used -= int64(len(ent.val))
	}
}
