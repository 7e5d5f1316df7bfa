"""FairBatcher: deficit round-robin by tokens across tenants, bounded batches, failures stay in their batch."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from prefixserve.server.batching import FairBatcher, estimate_tokens


class Recorder:
    """A run_batch that records each batch's rows (tenant, index) and answers with the row itself."""

    def __init__(self, delay: float = 0.0, fail_on: str | None = None):
        self.batches: list[list[tuple[str, int]]] = []
        self.delay, self.fail_on = delay, fail_on

    async def __call__(self, rows: list[tuple[str, int]]) -> Sequence[tuple[str, int]]:
        self.batches.append(list(rows))
        await asyncio.sleep(self.delay)
        if self.fail_on and any(t == self.fail_on for t, _ in rows):
            raise RuntimeError("forward failed")
        return rows


def make(rec: Recorder, **kw) -> FairBatcher[tuple[str, int], tuple[str, int]]:
    opts = dict(max_batch_size=8, max_batch_tokens=400, wait_timeout_s=0.0) | kw
    return FairBatcher(rec, **opts)


def test_a_bystander_gets_into_the_next_batch_behind_a_flood():
    async def main():
        rec = Recorder(delay=0.01)
        b = make(rec)
        flood = asyncio.create_task(b.submit("flood", [("flood", i) for i in range(200)], [50] * 200))
        while not rec.batches:  # the flood is queued and its first forward is running (no timing guess)
            await asyncio.sleep(0)
        mine = await b.submit("bystander", [("bystander", 0)], [10])
        served_in = next(i for i, batch in enumerate(rec.batches) if ("bystander", 0) in batch)
        await flood
        return mine, served_in, rec

    mine, served_in, rec = asyncio.run(main())
    assert mine == [("bystander", 0)]
    assert served_in <= 1, f"bystander waited {served_in} batches behind the flood"
    assert all(len(batch) <= 8 for batch in rec.batches)
    flood_rows = [r for batch in rec.batches for r in batch if r[0] == "flood"]
    assert flood_rows == [("flood", i) for i in range(200)]  # every row once, in order


def test_busy_tenants_share_tokens_not_rows():
    async def main():
        rec = Recorder()
        b = make(rec, max_batch_size=64, max_batch_tokens=512)
        await asyncio.gather(
            b.submit("long", [("long", i) for i in range(60)], [128] * 60),
            b.submit("short", [("short", i) for i in range(240)], [16] * 240),
        )
        return rec

    rec = asyncio.run(main())
    first = rec.batches[:6]  # while both are busy
    long_tokens = sum(128 for batch in first for t, _ in batch if t == "long")
    short_tokens = sum(16 for batch in first for t, _ in batch if t == "short")
    assert 0.5 < long_tokens / short_tokens < 2.0, (long_tokens, short_tokens)
    assert all(sum(128 if t == "long" else 16 for t, _ in batch) <= 512 for batch in rec.batches)


def test_an_oversized_row_runs_alone_and_failures_stay_in_their_batch():
    async def main():
        rec = Recorder(fail_on="bad")
        b = make(rec, max_batch_tokens=100)
        big = await b.submit("t", [("t", 0)], [1000])
        with pytest.raises(RuntimeError):
            await b.submit("bad", [("bad", 0)], [10])
        ok = await b.submit("t", [("t", 1), ("t", 2)], [10, 10])
        return big, ok, rec

    big, ok, rec = asyncio.run(main())
    assert big == [("t", 0)] and rec.batches[0] == [("t", 0)]
    assert ok == [("t", 1), ("t", 2)]


def test_the_token_budget_follows_the_time_target():
    async def main():
        rec = Recorder(delay=0.02)  # 20 ms per forward, whatever its size
        b = make(rec, max_batch_size=64, max_batch_tokens=4000, target_batch_s=0.01)
        await b.submit("t", [("t", i) for i in range(200)], [100] * 200)
        return b, rec

    b, rec = asyncio.run(main())
    assert b.cost_model.fit() is not None and b.token_budget() < 4000  # forwards ran over the 10 ms target
    assert len(rec.batches[0]) == 40  # before any measurement: the configured budget
    sizes = [len(batch) for batch in rec.batches]
    assert all(n <= 20 for n in sizes[1:]) and sizes[-2] < sizes[1]  # then the budget shrinks towards 10 rows
    assert FairBatcher(rec, max_batch_size=8, max_batch_tokens=400, wait_timeout_s=0).token_budget() == 400


def test_the_cost_model_separates_fixed_overhead_from_tokens():
    from prefixserve.server.batching import ForwardCost

    model = ForwardCost()
    assert model.tokens_within(0.05) is None
    for tokens in (5, 800, 5, 400, 1200, 5):  # light forwards between heavy ones
        model.observe(tokens, 0.004 + 0.00005 * tokens)
    fitted = model.fit()
    assert fitted is not None
    fixed, per_token = fitted
    assert abs(fixed - 0.004) < 1e-4 and abs(per_token - 0.00005) < 1e-6
    assert abs((model.tokens_within(0.05) or 0) - 920) <= 1  # (50 - 4 ms) / 0.05 ms; a per-token mean says ~60


def test_token_estimate():
    assert estimate_tokens("") == 2 and estimate_tokens("x" * 400) == 102
    assert estimate_tokens("x" * 10_000, max_row_tokens=512) == 512 and estimate_tokens("ab", "cd") == 3


def test_light_tenants_go_first_but_cannot_starve_a_heavy_one():
    async def main():
        rec = Recorder(delay=0.005)
        b = make(rec, max_batch_size=16, max_batch_tokens=4000)
        heavy = asyncio.create_task(b.submit("heavy", [("heavy", i) for i in range(64)], [100] * 64))
        while not rec.batches:  # the heavy backlog is queued and its first forward runs (no timing guess)
            await asyncio.sleep(0)
        lights = [asyncio.create_task(b.submit(f"light{j}", [(f"light{j}", 0)], [10])) for j in range(3)]
        await asyncio.gather(heavy, *lights)
        return rec

    rec = asyncio.run(main())
    light_batch = next(i for i, batch in enumerate(rec.batches) if any(t.startswith("light") for t, _ in batch))
    assert light_batch <= 1 and all(t.startswith("light") for t, _ in rec.batches[light_batch])  # short, alone
    assert all(  # never two light-only batches in a row while the heavy tenant waits
        not (all(t.startswith("light") for t, _ in a) and all(t.startswith("light") for t, _ in b))
        for a, b in zip(rec.batches, rec.batches[1:])
    )


def test_each_batch_reports_its_tokens_and_budget():
    from prefixserve.adapters.cache import CacheStats
    from prefixserve.server.metrics import WorkerStats

    formed: list[tuple[int, int]] = []
    stats = WorkerStats("r1")

    def on_formed(tokens: int, budget: int) -> None:
        formed.append((tokens, budget))
        stats.formed(tokens, budget)

    async def main():
        b = FairBatcher(Recorder(), max_batch_size=8, max_batch_tokens=400, wait_timeout_s=0.0, on_formed=on_formed)
        await b.submit("t", [("t", i) for i in range(10)], [30] * 10)

    asyncio.run(main())
    assert formed == [(240, 400), (60, 400)]  # 8 rows x 30 tokens, then the 2 left
    snap = stats.snapshot(CacheStats())
    assert snap.batch_tokens.sum == 300 and sum(snap.batch_fill.counts) == 2
    assert snap.batch_fill.counts[snap.batch_fill.bounds.index(0.6)] == 1  # 240/400 = 0.6
