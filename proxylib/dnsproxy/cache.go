package dnsproxy

import (
	"container/list"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"
)

// Cache holds forwarded answers for their TTL, at most Max of them (the
// least recently used goes first). Only NOERROR answers with a positive
// TTL and negative answers (NXDOMAIN, NODATA) with an SOA are kept, as RFC
// 2308 says; truncated answers and failures never are. Safe for
// concurrent use.
type Cache struct {
	max    int
	maxTTL time.Duration
	now    func() time.Time

	mu    sync.Mutex
	ll    *list.List // front: most recently used
	items map[cacheKey]*list.Element
}

// cacheKey: the upstream set (pods with other resolvers may get other
// answers), the question, and the flags that change an answer.
type cacheKey struct {
	upstreams     string
	name          string
	qtype, qclass uint16
	do, cd        bool
}

type cacheEntry struct {
	key     cacheKey
	msg     *dns.Msg
	stored  time.Time
	expires time.Time
}

// DefaultCacheSize bounds the node's cache of forwarded answers.
const DefaultCacheSize = 4096

// DefaultMaxCacheTTL caps how long an answer is kept, whatever its TTL.
const DefaultMaxCacheTTL = 5 * time.Minute

// NewCache returns a cache of at most max answers (max <= 0: DefaultCacheSize)
// kept at most maxTTL (<= 0: DefaultMaxCacheTTL).
func NewCache(max int, maxTTL time.Duration) *Cache {
	if max <= 0 {
		max = DefaultCacheSize
	}
	if maxTTL <= 0 {
		maxTTL = DefaultMaxCacheTTL
	}
	return &Cache{max: max, maxTTL: maxTTL, now: time.Now, ll: list.New(), items: map[cacheKey]*list.Element{}}
}

func keyOf(upstreams []string, req *dns.Msg) (cacheKey, bool) {
	if len(req.Question) != 1 {
		return cacheKey{}, false
	}
	q := req.Question[0]
	k := cacheKey{upstreams: strings.Join(upstreams, ","), name: strings.ToLower(q.Name), qtype: q.Qtype, qclass: q.Qclass,
		cd: req.CheckingDisabled}
	if opt := req.IsEdns0(); opt != nil {
		k.do = opt.Do()
	}
	return k, true
}

// Len is the number of answers held.
func (c *Cache) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ll.Len()
}

// Get returns a copy of the cached answer with its TTLs lowered by the
// time it spent in the cache.
func (c *Cache) Get(k cacheKey) (*dns.Msg, bool) {
	now := c.now()
	c.mu.Lock()
	el, ok := c.items[k]
	if !ok {
		c.mu.Unlock()
		return nil, false
	}
	e := el.Value.(*cacheEntry)
	if !now.Before(e.expires) {
		c.ll.Remove(el)
		delete(c.items, k)
		c.mu.Unlock()
		return nil, false
	}
	c.ll.MoveToFront(el)
	m := e.msg.Copy()
	stored := e.stored
	c.mu.Unlock()
	aged := uint32(now.Sub(stored) / time.Second)
	for _, sec := range [][]dns.RR{m.Answer, m.Ns, m.Extra} {
		for _, rr := range sec {
			if h := rr.Header(); h.Rrtype != dns.TypeOPT {
				h.Ttl = max(h.Ttl, aged) - aged
			}
		}
	}
	return m, true
}

// Put keeps m (copied) under k for its TTL, when it may be cached.
func (c *Cache) Put(k cacheKey, m *dns.Msg) {
	ttl, ok := cacheTTL(m)
	if !ok {
		return
	}
	d := min(time.Duration(ttl)*time.Second, c.maxTTL)
	now := c.now()
	e := &cacheEntry{key: k, msg: m.Copy(), stored: now, expires: now.Add(d)}
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.items[k]; ok {
		el.Value = e
		c.ll.MoveToFront(el)
		return
	}
	c.items[k] = c.ll.PushFront(e)
	for c.ll.Len() > c.max {
		old := c.ll.Back()
		c.ll.Remove(old)
		delete(c.items, old.Value.(*cacheEntry).key)
	}
}

// cacheTTL is how long m may be cached: the smallest TTL of its records
// for an answer, the SOA's (capped by its MINIMUM) for a negative answer.
func cacheTTL(m *dns.Msg) (uint32, bool) {
	if m == nil || m.Truncated {
		return 0, false
	}
	negative := m.Rcode == dns.RcodeNameError || (m.Rcode == dns.RcodeSuccess && len(m.Answer) == 0)
	switch {
	case negative:
		for _, rr := range m.Ns {
			if soa, ok := rr.(*dns.SOA); ok {
				ttl := min(soa.Hdr.Ttl, soa.Minttl)
				return ttl, ttl > 0
			}
		}
		return 0, false
	case m.Rcode != dns.RcodeSuccess:
		return 0, false
	}
	ttl, found := uint32(0), false
	for _, sec := range [][]dns.RR{m.Answer, m.Ns, m.Extra} {
		for _, rr := range sec {
			h := rr.Header()
			if h.Rrtype == dns.TypeOPT {
				continue
			}
			if !found || h.Ttl < ttl {
				ttl, found = h.Ttl, true
			}
		}
	}
	return ttl, found && ttl > 0
}
