"""The Redis change feed: the store's pub/sub channel turned into ``ChangeEvent``s.

Pub/sub is fire-and-forget: whatever is published while a subscriber is disconnected is lost. So
every reconnect -- ours after an error, or the one redis-py does silently inside ``get_message`` --
emits a ``resync`` event, telling subscribers to drop or revalidate what they derived from the feed.
This module imports ``redis`` at import time; :mod:`.redis_store` loads it only when a feed starts.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import redis
from redis.client import PubSub

from .base import ChangeEvent

RESYNC = ChangeEvent("", "", None, resync=True)


class FeedPubSub(PubSub):
    """PubSub that says when redis-py silently reconnected and resubscribed (messages were lost)."""

    on_resubscribe: Callable[[], None] | None = None

    def on_connect(self, connection) -> None:
        resubscribing = bool(self.channels)  # empty on the first connect
        super().on_connect(connection)
        if resubscribing and self.on_resubscribe is not None:
            self.on_resubscribe()


def parse_event(data: bytes | str) -> ChangeEvent | None:
    """The event in one channel message, ``{"t": tenant, "p": prefix id, "v": version or null}``;
    None for anything malformed (a stray publisher must not stop the feed)."""
    try:
        d = json.loads(data)
        return ChangeEvent(str(d["t"]), str(d["p"]), None if d["v"] is None else int(d["v"]))
    except (ValueError, KeyError, TypeError):
        return None


def listen(
    client: redis.Redis,
    channel: str,
    emit: Callable[[ChangeEvent], None],
    *,
    ready: threading.Event,
    closed: threading.Event,
) -> None:
    """Deliver ``channel``'s events to ``emit`` until ``closed`` is set (run it on its own thread).

    ``ready`` is set once subscribed: events published after that are delivered. Connection errors
    emit ``RESYNC`` and resubscribe with exponential backoff (0.05 s doubling to 2 s).
    """
    backoff = 0.05
    while not closed.is_set():
        pubsub = FeedPubSub(client.connection_pool, ignore_subscribe_messages=True)
        pubsub.on_resubscribe = lambda: emit(RESYNC)
        try:
            pubsub.subscribe(channel)
            ready.set()
            backoff = 0.05
            while not closed.is_set():
                msg = pubsub.get_message(timeout=0.2)
                if msg and msg.get("type") == "message":
                    event = parse_event(msg["data"])
                    if event is not None:
                        emit(event)
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            emit(RESYNC)
            closed.wait(backoff)
            backoff = min(backoff * 2, 2.0)
        finally:
            pubsub.close()
