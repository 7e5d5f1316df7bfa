"""The realistic request mix: lognormal token lengths, texts built from the tokenizer's own vocabulary.

Decisions:
* **Lengths** are lognormal (median ``median`` tokens, ``sigma`` 0.9 in log space), rounded and clipped to
  ``[3, max_len]`` ([CLS] word [SEP] at least): most rows are short, a few are long (p99 ~ 8x the median,
  the clip at 256 is hit by ~2 rows in 1,000 at median 18). Short texts with a long tail is what a
  classification service sees; a fixed 64 tokens (``bench.engine``) hides the cost of padding.
* **Texts** are words of the tokenizer's vocabulary that tokenize to exactly one token on their own, joined
  by spaces, then checked by tokenizing the whole batch (and fixed word by word where a tokenizer merges
  differently), so every row has exactly its drawn token count, specials included.
* Rows keep **arrival order** (the draw order); bench variants that sort do so themselves.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

SIGMA = 0.9  # log-space spread of the lognormal lengths
MIN_TOKENS = 3  # [CLS] word [SEP]


@dataclass(frozen=True)
class Mix:
    """``texts[i]`` has exactly ``lengths[i]`` tokens (specials included); rows in arrival order."""

    texts: list[str]
    lengths: list[int]
    median: float
    sigma: float
    max_len: int
    seed: int

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    def describe(self) -> dict:
        s = sorted(self.lengths)
        q = lambda f: s[min(len(s) - 1, int(f * len(s)))]  # noqa: E731
        return {
            "rows": len(s),
            "median_target": self.median,
            "sigma": self.sigma,
            "max_len": self.max_len,
            "seed": self.seed,
            "tokens": self.tokens,
            "mean": self.tokens / max(len(s), 1),
            "p50": q(0.5),
            "p90": q(0.9),
            "p99": q(0.99),
            "max": s[-1] if s else 0,
        }


def lognormal_lengths(n: int, median: float, sigma: float, max_len: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [max(MIN_TOKENS, min(max_len, round(math.exp(rng.gauss(math.log(median), sigma))))) for _ in range(n)]


def single_token_words(tokenizer) -> list[str]:
    """Vocabulary entries that are one token when tokenized alone (no specials, no ``##`` pieces, no UNK)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    specials = set(getattr(tokenizer, "all_special_tokens", []))
    candidates = sorted(
        w
        for w in tokenizer.get_vocab()
        if w not in specials and w.isprintable() and w.strip() == w and w and not w.startswith(("##", "[", "<"))
    )
    ids = tokenizer(candidates, add_special_tokens=False)["input_ids"]
    words = [w for w, x in zip(candidates, ids) if len(x) == 1 and x[0] != unk]
    if not words:
        raise ValueError("the tokenizer has no single-token words to build texts from")
    return words


def make_mix(tokenizer, n: int, *, median: float = 18, sigma: float = SIGMA, max_len: int = 256, seed: int = 0) -> Mix:
    """``n`` rows with lognormal token counts (see the module docstring) and texts of exactly that many tokens."""
    rng = random.Random(seed + 1)
    lengths = lognormal_lengths(n, median, sigma, max_len, seed)
    words = single_token_words(tokenizer)
    specials = len(tokenizer("")["input_ids"])  # [CLS] [SEP]
    rows = [[rng.choice(words) for _ in range(max(1, k - specials))] for k in lengths]
    for _ in range(20):  # a tokenizer that merges across words: drop or add words until every count is exact
        counts = [len(x) for x in tokenizer([" ".join(r) for r in rows])["input_ids"]]
        wrong = [i for i, (c, k) in enumerate(zip(counts, lengths)) if c != k]
        if not wrong:
            break
        for i in wrong:
            if counts[i] > lengths[i] and len(rows[i]) > 1:
                rows[i].pop()
            elif counts[i] < lengths[i]:
                rows[i].append(rng.choice(words))
    texts = [" ".join(r) for r in rows]
    actual = [len(x) for x in tokenizer(texts)["input_ids"]]  # the truth, whatever the fix-up reached
    return Mix(texts, actual, median, sigma, max_len, seed)


def adapter_of(rep: int, rows: int, j: int, distinct: int) -> int:
    """Row ``j`` of repetition ``rep`` uses adapter ``(rep*rows + j) % distinct``: successive batches walk all."""
    return (rep * rows + j) % distinct
