"""Device-resident adapter cache: LRU under a byte budget, with counters.

Hot adapters stay on the device so a batch does not copy them host->device every time. Keys are
:class:`~prefixserve.adapters.ref.AdapterRef` (immutable versions), so a new version is a new entry and
the old one ages out, or is dropped early by :meth:`AdapterCache.discard` on a change-feed event.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass
from typing import Generic, TypeVar

DEFAULT_BUDGET_BYTES = 2 * 2**30  # per engine (Worker replica); AppSettings.cache_bytes defaults to it
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    resident: int = 0
    resident_bytes: int = 0
    budget_bytes: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class AdapterCache(Generic[K, V]):
    """``get(key, load)`` returns the cached value or calls ``load()`` (outside the lock) and keeps it.

    ``size_of(value)`` gives its device bytes. An entry larger than the whole budget is returned
    but not kept.
    """

    def __init__(self, budget_bytes: int, size_of: Callable[[V], int]):
        self.budget = int(budget_bytes)
        self._size_of = size_of
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = CacheStats(budget_bytes=self.budget)

    def lookup(self, key: K) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            self.stats.hits += 1
            return item[0]

    def get(self, key: K, load: Callable[[], V]) -> V:
        hit = self.lookup(key)
        if hit is not None:
            return hit
        value = load()  # may be slow (store fetch, host->device copy): not under the lock
        with self._lock:
            self.stats.misses += 1
            if key in self._items:  # a concurrent loader won
                return self._items[key][0]
            self._insert(key, value)
        return value

    def _insert(self, key: K, value: V) -> None:
        size = self._size_of(value)
        if size > self.budget:
            return
        while self._bytes + size > self.budget:
            _, (_, victim_size) = self._items.popitem(last=False)  # least recently used
            self._bytes -= victim_size
            self.stats.evictions += 1
        self._items[key] = (value, size)
        self._bytes += size
        self._update()

    def _update(self) -> None:
        self.stats.resident = len(self._items)
        self.stats.resident_bytes = self._bytes

    def discard(self, key: K) -> bool:
        """Drop exactly ``key`` (e.g. a superseded version); True if it was resident."""
        with self._lock:
            item = self._items.pop(key, None)
            if item is None:
                return False
            self._bytes -= item[1]
            self._update()
            return True

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)
