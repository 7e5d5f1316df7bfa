"""Device adapter cache: LRU under a byte budget, counters, exact discard."""

from collections.abc import Callable

from prefixserve.adapters.cache import AdapterCache
from prefixserve.adapters.ref import AdapterRef

SHA, OTHER = "a" * 64, "b" * 64


def loader(name: str, size: int) -> Callable[[], tuple[str, int]]:
    return lambda: (name, size)


def make(budget: int = 100) -> AdapterCache[str, tuple[str, int]]:
    return AdapterCache(budget, size_of=lambda v: v[1])


def test_lru_evicts_least_recent_within_budget():
    c = make(100)
    for k in "abc":
        c.get(k, loader(k, 40))  # c evicts a (120 > 100)
    assert "a" not in c and "b" in c and "c" in c
    c.get("b", lambda: ("never", 0))  # hit refreshes b
    c.get("d", lambda: ("d", 40))  # evicts c, not b
    assert "b" in c and "c" not in c
    s = c.stats
    assert (s.hits, s.misses, s.evictions, s.resident, s.resident_bytes) == (1, 4, 2, 2, 80)


def test_oversize_is_served_uncached():
    c = make(100)
    c.get("x", lambda: ("x", 30))
    assert c.get("big", lambda: ("big", 500)) == ("big", 500) and "big" not in c
    assert "x" in c and c.stats.evictions == 0


def test_discard_is_exact_on_refs():
    c: AdapterCache[AdapterRef, tuple[str, int]] = AdapterCache(1000, size_of=lambda v: v[1])
    one, twelve = AdapterRef("t", "p", 1, SHA), AdapterRef("t", "p", 12, SHA)
    for ref in (one, twelve):
        c.get(ref, loader(str(ref), 1))
    assert c.discard(AdapterRef("t", "p", 1, SHA)) and not c.discard(one)
    assert twelve in c and c.stats.resident_bytes == 1


def test_refs_are_values():
    assert AdapterRef("t", "p", 3, SHA) == AdapterRef("t", "p", 3, SHA)
    assert str(AdapterRef("t", "p", 3, SHA)) == "t/p@3#aaaaaaaaaaaa"
    assert AdapterRef("t", "p", 3, SHA) != AdapterRef("t", "p", 3, OTHER)  # same name and version, other bytes
    assert len({AdapterRef("t", "p", 3, SHA), AdapterRef("t", "p", 3, SHA), AdapterRef("u", "p", 3, SHA)}) == 2
    for bad in (0, -1, True, "3"):
        try:
            AdapterRef("t", "p", bad, SHA)  # type: ignore[arg-type]
        except ValueError:
            continue
        raise AssertionError(f"version {bad!r} accepted")
