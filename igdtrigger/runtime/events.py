"""Fan-out of service events (activations, mappings) to live subscribers (the SSE stream).

Each subscriber has a bounded queue. Publishing never blocks or fails: when a slow client's queue
is full its oldest events are dropped and counted, and the stream tells the client to re-read the
status (``event: lost``). The service keeps its own short history for ``Last-Event-ID`` replay.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

from igdtrigger.core.errors import TooManySubscribers

__all__ = [
    "MAX_ADMIN_SUBSCRIBERS",
    "MAX_SUBSCRIBERS",
    "MAX_SUBSCRIBERS_PER_CLIENT",
    "SUBSCRIBER_QUEUE",
    "EventHub",
    "Subscriber",
]

Event = dict[str, Any]

SUBSCRIBER_QUEUE = 256  # events buffered per client before the oldest are dropped
MAX_SUBSCRIBERS = 64  # streams open at once, all clients without the admin token together
MAX_SUBSCRIBERS_PER_CLIENT = 4
MAX_ADMIN_SUBSCRIBERS = 8  # kept apart: other clients filling their pool cannot lock out the admin


class Subscriber:
    """One event stream's bounded queue (``maxlen`` events, oldest dropped and counted). ``client``
    is the ``Caller.key()`` it counts against; ``admin`` puts it in the admin's own pool."""

    __slots__ = ("_wake", "admin", "client", "closed", "dropped", "queue")

    def __init__(self, client: str, maxlen: int = SUBSCRIBER_QUEUE, *,
                 admin: bool = False) -> None:
        self.client = client
        self.admin = admin
        self.queue: collections.deque[Event] = collections.deque(maxlen=maxlen)
        self.dropped = 0
        self.closed = False
        self._wake = asyncio.Event()

    def push(self, event: Event) -> None:
        """Queue ``event`` for this stream; a full queue drops its oldest event (counted in
        ``dropped``). Never blocks."""
        if len(self.queue) == self.queue.maxlen:
            self.dropped += 1
        self.queue.append(event)
        self._wake.set()

    def close(self) -> None:
        """End the stream: ``wait`` returns at once from now on."""
        self.closed = True
        self._wake.set()

    async def wait(self, timeout: float) -> bool:
        """Wait until there is something to send (or closed). False on timeout."""
        if self.queue or self.closed:
            return True
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def take(self) -> tuple[list[Event], int]:
        """Everything queued, and how many events were dropped since the last take."""
        events = list(self.queue)
        self.queue.clear()
        dropped, self.dropped = self.dropped, 0
        return events, dropped


class EventHub:
    """Sequence numbers, a short history for replay, and the live subscribers."""

    def __init__(self, history: int = 200) -> None:
        self.history: collections.deque[Event] = collections.deque(maxlen=history)
        self.seq = 0
        self.subscribers: set[Subscriber] = set()
        self.published = 0

    def publish(self, event: Event) -> Event:
        """Number ``event`` (its ``seq``, from 1), keep it in the history and queue it for every
        subscriber. Returns the numbered event."""
        self.seq += 1
        event = {"seq": self.seq, **event}
        self.history.append(event)
        self.published += 1
        for sub in self.subscribers:
            sub.push(event)
        return event

    def since(self, seq: int) -> list[Event]:
        """The history's events after ``seq`` (``Last-Event-ID`` replay); older ones are gone."""
        return [e for e in self.history if e["seq"] > seq]

    def subscribe(self, client: str, maxlen: int = SUBSCRIBER_QUEUE, *,
                  admin: bool = False) -> Subscriber:
        """A new stream. The admin's streams (``admin``) have a pool of their own
        (``MAX_ADMIN_SUBSCRIBERS``); everyone else shares ``MAX_SUBSCRIBERS``, at most
        ``MAX_SUBSCRIBERS_PER_CLIENT`` each. Raises ``TooManySubscribers``."""
        pool = [s for s in self.subscribers if s.admin == admin]
        if admin:
            if len(pool) >= MAX_ADMIN_SUBSCRIBERS:
                raise TooManySubscribers(
                    f"the admin has {MAX_ADMIN_SUBSCRIBERS} event streams open already")
        else:
            if len(pool) >= MAX_SUBSCRIBERS:
                raise TooManySubscribers(f"{MAX_SUBSCRIBERS} event streams are open already")
            if sum(1 for s in pool if s.client == client) >= MAX_SUBSCRIBERS_PER_CLIENT:
                raise TooManySubscribers(
                    f"{client} has {MAX_SUBSCRIBERS_PER_CLIENT} event streams open already")
        sub = Subscriber(client, maxlen, admin=admin)
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        """Forget ``sub`` (its stream ended); an unknown one is ignored."""
        self.subscribers.discard(sub)

    def close_all(self) -> None:
        """Close every stream (service shutdown): each ``wait`` returns and the streams end."""
        for sub in list(self.subscribers):
            sub.close()
        self.subscribers.clear()
