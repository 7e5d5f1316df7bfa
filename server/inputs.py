"""Checks on classify inputs that the request schema cannot express (limits a deployment tunes, text that
cannot be tokenized). They run at the Ingress, so a bad input costs one 422 naming it, not a forward.

(A module of its own: Serve pickles the Ingress class by value, so what it calls must be importable.)
"""

from __future__ import annotations

from collections.abc import Sequence

from prefixserve.adapters.errors import PrefixServeError


def check_texts(inputs: Sequence[str], pairs: Sequence[str | None] | None, *, max_chars: int) -> None:
    """422 naming the first input that is too long or cannot be encoded (e.g. a lone UTF-16 surrogate)."""
    for field, texts in (("inputs", inputs), ("text_pairs", pairs or ())):
        for i, text in enumerate(texts):
            if text is None:
                continue
            if len(text) > max_chars:
                raise PrefixServeError(
                    f"{field}[{i}] has {len(text)} characters; at most {max_chars}", code="text_too_long", status=422
                )
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise PrefixServeError(
                    f"{field}[{i}] is not valid Unicode text (character {exc.start}: a lone surrogate)",
                    code="bad_text",
                    status=422,
                ) from None
