"""Device-resident adapter cache: LRU under a byte budget, with pinning and counters.

Hot adapters stay on the device so a batch does not copy them host->device every time. Keys
include the version (``tenant/prefix@v3``), so a new version is a new entry and the old one just
ages out (or is dropped eagerly by :meth:`invalidate` on a change-feed event).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    resident: int = 0
    resident_bytes: int = 0
    budget_bytes: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class AdapterCache(Generic[T]):
    """``get(key, load)`` returns the cached value or calls ``load()`` (outside the lock) and keeps it.

    ``size_of(value)`` gives its device bytes. An entry larger than the whole budget is returned
    but not kept. Pinned keys are never evicted.
    """

    def __init__(self, budget_bytes: int, size_of: Callable[[T], int]):
        self.budget = int(budget_bytes)
        self._size_of = size_of
        self._items: OrderedDict[str, tuple[T, int]] = OrderedDict()
        self._pinned: set[str] = set()
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = CacheStats(budget_bytes=self.budget)

    def lookup(self, key: str) -> T | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            self.stats.hits += 1
            return item[0]

    def get(self, key: str, load: Callable[[], T]) -> T:
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

    def put(self, key: str, value: T) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._insert(key, value)

    def _insert(self, key: str, value: T) -> None:
        size = self._size_of(value)
        if size > self.budget:
            return
        while self._bytes + size > self.budget:
            victim = next((k for k in self._items if k not in self._pinned), None)
            if victim is None:
                return  # everything pinned: serve without caching
            self._bytes -= self._items.pop(victim)[1]
            self.stats.evictions += 1
        self._items[key] = (value, size)
        self._bytes += size
        self._update()

    def _update(self) -> None:
        self.stats.resident = len(self._items)
        self.stats.resident_bytes = self._bytes

    def pin(self, key: str) -> None:
        with self._lock:
            self._pinned.add(key)

    def unpin(self, key: str) -> None:
        with self._lock:
            self._pinned.discard(key)

    def discard(self, key: str) -> bool:
        """Drop exactly ``key`` (e.g. a superseded ``tenant/prefix@3``); True if it was resident."""
        with self._lock:
            item = self._items.pop(key, None)
            if item is None:
                return False
            self._bytes -= item[1]
            self._pinned.discard(key)
            self._update()
            return True

    def invalidate(self, prefix: str) -> int:
        """Drop every entry whose key starts with ``prefix`` (e.g. ``tenant/prefix@``)."""
        with self._lock:
            drop = [k for k in self._items if k.startswith(prefix)]
            for k in drop:
                self._bytes -= self._items.pop(k)[1]
                self._pinned.discard(k)
            self._update()
            return len(drop)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)
