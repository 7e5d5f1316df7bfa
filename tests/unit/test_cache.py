"""Device adapter cache: LRU under a byte budget, pinning, counters, invalidation."""

from prefixserve.adapters.cache import AdapterCache


def make(budget=100):
    return AdapterCache(budget, size_of=lambda v: v[1])


def test_lru_evicts_least_recent_within_budget():
    c = make(100)
    for k in "abc":
        c.get(k, lambda k=k: (k, 40))  # c evicts a (120 > 100)
    assert "a" not in c and "b" in c and "c" in c
    c.get("b", lambda: ("never", 0))  # hit refreshes b
    c.get("d", lambda: ("d", 40))  # evicts c, not b
    assert "b" in c and "c" not in c
    s = c.stats
    assert (s.hits, s.misses, s.evictions, s.resident, s.resident_bytes) == (1, 4, 2, 2, 80)


def test_pinned_entries_survive_and_oversize_is_served_uncached():
    c = make(100)
    c.get("hot", lambda: ("hot", 60))
    c.pin("hot")
    c.get("x", lambda: ("x", 30))
    c.get("y", lambda: ("y", 30))  # must evict x, not the pinned hot
    assert "hot" in c and "x" not in c
    assert c.get("big", lambda: ("big", 500)) == ("big", 500) and "big" not in c


def test_invalidate_by_key_prefix():
    c = make(1000)
    for k in ("t1/p@1", "t1/p@2", "t1/q@1", "t2/p@1"):
        c.get(k, lambda k=k: (k, 1))
    assert c.invalidate("t1/p@") == 2
    assert "t1/q@1" in c and "t2/p@1" in c and c.stats.resident == 2


def test_discard_is_exact():
    c = make(1000)
    for k in ("t/p@1", "t/p@12"):
        c.get(k, lambda k=k: (k, 1))
    assert c.discard("t/p@1") and not c.discard("t/p@1")
    assert "t/p@12" in c and c.stats.resident_bytes == 1
