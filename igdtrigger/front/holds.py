"""The live flows the IGD front follows for its mappings, and which mappings they hold.

Pure bookkeeping (no clock, no I/O): :class:`~igdtrigger.front.manager.FrontManager` decides
what a flow means (use at a time, a hold taken or dropped) with the semantics of
``Engine.on_flow_live``/``on_flow_ended``, and keeps here, per flow, the mappings
(:class:`MappingKey`) it is use of and whether it is a *connection* (TCP established in
conntrack, a connected socket: ``FlowLive(connected=True)``) that holds them however silent it
is, until the detector reports it ended (``FlowEnded``) or no longer connected.

Bounded, as every table a LAN host (or anyone beyond the WAN connecting to a mapped port) can
grow: at most ``MAX_FLOWS_PER_MAPPING`` flows followed per mapping and ``MAX_FLOWS`` in all. At
a mapping's cap a new flow takes the place of the oldest followed one that is not a connection
(``evicted``), so churn (a peer opening flow after flow to the mapped port) never displaces a
connection that holds the mapping; when all are connections, or ``MAX_FLOWS`` are followed, the
new flow is not followed (``refused``): it still counts as use each time a detector reports it,
but its silence does not hold the mapping and its end is not watched. The mapping stays held as
long as one of its followed connections lives.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from igdtrigger.core.model import Flow, MappingKey
from igdtrigger.front.contract import FrontMapping

__all__ = ["MAX_FLOWS", "MAX_FLOWS_PER_MAPPING", "FlowHolds", "Followed", "decrement", "key_of"]

MAX_FLOWS_PER_MAPPING = 64  # live flows followed per mapping
MAX_FLOWS = 4096  # ... and in all (the engine's own bound on the flows it follows)


def key_of(m: FrontMapping) -> MappingKey:
    """The mapping's key on the upstream router: its protocol and external port."""
    return MappingKey(m.request.proto, m.grant.external_port)


def decrement(counter: collections.Counter[Any], keys: Iterable[Any]) -> None:
    """Count ``keys`` down by one each in ``counter``, dropping those at zero."""
    for key in keys:
        n = counter[key] - 1
        if n > 0:
            counter[key] = n
        else:
            del counter[key]


@dataclass(slots=True)
class Followed:
    """A followed flow: the mappings it is use of, and whether it is a connection."""

    keys: set[MappingKey] = field(default_factory=set)
    connected: bool = False


class FlowHolds:
    """Followed flows by flow, with per-mapping counts (``follow``, ``connect``, ``end``,
    ``drop``); ``held()`` lists the mappings a live connection holds."""

    def __init__(self, *, max_per_mapping: int = MAX_FLOWS_PER_MAPPING,
                 max_flows: int = MAX_FLOWS) -> None:
        self.max_per_mapping = max_per_mapping
        self.max_flows = max_flows
        self._flows: dict[Flow, Followed] = {}
        self._by_key: dict[MappingKey, dict[Flow, None]] = {}  # each mapping's, oldest first
        self._holding: collections.Counter[MappingKey] = collections.Counter()  # connections
        self.refused = 0  # flows not followed because a cap was hit
        self.evicted = 0  # flows forgotten to make room at a mapping's cap (none a connection)

    def __contains__(self, flow: object) -> bool:
        return flow in self._flows

    def __len__(self) -> int:
        return len(self._flows)

    def flows(self) -> list[Flow]:
        """Every followed flow."""
        return list(self._flows)

    def keys_of(self, flow: Flow) -> set[MappingKey] | None:
        """The mappings ``flow`` is followed for (None: not followed)."""
        followed = self._flows.get(flow)
        return None if followed is None else followed.keys

    def follow(self, flow: Flow, keys: Iterable[MappingKey]) -> bool:
        """Follow ``flow`` for ``keys``. At a mapping's cap the oldest of its followed flows
        that is not a connection is forgotten to make room (``evicted``: churn never displaces
        a hold); a mapping whose followed flows are all connections gets no more. False
        (counted in ``refused``) when no mapping has room or ``max_flows`` are followed. A
        followed flow stays as it is."""
        if flow in self._flows:
            return True
        room: set[MappingKey] = set()
        if len(self._flows) < self.max_flows:
            for key in keys:
                flows = self._by_key.get(key)
                if flows is None or len(flows) < self.max_per_mapping or self._evict(flows):
                    room.add(key)
        if not room:
            self.refused += 1
            return False
        for key in room:
            self._by_key.setdefault(key, {})[flow] = None
        self._flows[flow] = Followed(room)
        return True

    def _evict(self, flows: dict[Flow, None]) -> bool:
        """Forget the oldest of ``flows`` that is not a connection; False: all are."""
        for old in flows:
            if not self._flows[old].connected:
                self.end(old)
                self.evicted += 1
                return True
        return False

    def connect(self, flow: Flow, connected: bool) -> set[MappingKey]:
        """``flow`` is (or no longer is) a connection: the mappings whose hold it took or
        dropped (empty: not followed, or no change)."""
        followed = self._flows.get(flow)
        if followed is None or followed.connected == connected:
            return set()
        followed.connected = connected
        if connected:
            self._holding.update(followed.keys)
        else:
            decrement(self._holding, followed.keys)
        return set(followed.keys)

    def end(self, flow: Flow) -> Followed | None:
        """``flow`` is gone: what was followed of it (None: it was not), its holds dropped."""
        followed = self._flows.pop(flow, None)
        if followed is None:
            return None
        for key in followed.keys:
            flows = self._by_key.get(key)
            if flows is not None:
                flows.pop(flow, None)
                if not flows:
                    del self._by_key[key]
        if followed.connected:
            decrement(self._holding, followed.keys)
        return followed

    def drop(self, key: MappingKey) -> None:
        """Mapping ``key`` ended: no flow is followed for it any more (a flow that was use of
        nothing else is forgotten: the detectors stop looking at it)."""
        flows = self._by_key.pop(key, None)
        if flows is None:
            return
        self._holding.pop(key, None)
        for flow in flows:
            followed = self._flows[flow]
            followed.keys.discard(key)
            if not followed.keys:
                del self._flows[flow]

    def holds(self, key: MappingKey) -> bool:
        """Does a live connection hold mapping ``key``?"""
        return key in self._holding

    def held(self) -> list[MappingKey]:
        """Every mapping a live connection holds."""
        return list(self._holding)

    def clear(self) -> None:
        """Forget everything (the front stopped)."""
        self._flows.clear()
        self._by_key.clear()
        self._holding.clear()

    def counts(self) -> dict[str, int]:
        """For status: flows ``followed``, the ``holding`` ones (connections), ``refused`` and
        ``evicted`` at a cap."""
        return {"followed": len(self._flows),
                "holding": sum(1 for f in self._flows.values() if f.connected),
                "refused": self.refused, "evicted": self.evicted}
