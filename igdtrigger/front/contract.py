"""The IGD front's contract (issue 14): what a protocol server (UPnP IGD, NAT-PMP, PCP) hands
the :class:`~igdtrigger.front.manager.FrontManager` and what it gets back.

A :class:`ClientRequest` becomes a :class:`Grant` or a :class:`Refusal` (whose
:class:`RefusalKind` each protocol maps onto its own codes); a :class:`FrontMapping` is what the
front holds; a :class:`Forwarder` is topology 1's inner DNAT (``front/dnat.py``). Pure data, no
I/O; re-exported by ``front.manager``.
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from igdtrigger.core.model import Proto

__all__ = ["TRACE_ENV", "ClientRequest", "Forwarder", "FrontMapping", "FrontProtocol",
           "FrontTrace", "Grant", "Refusal", "RefusalKind"]

TRACE_ENV = "IGDTRIGGER_TRACE"  # the file runtime/mapper.py writes its traced adds to


class FrontProtocol(enum.StrEnum):
    """The protocol a client asked in (it names the activation's source)."""
    UPNP = "upnp"
    NATPMP = "natpmp"
    PCP = "pcp"


@dataclass(frozen=True, slots=True)
class ClientRequest:
    """One client's request for a mapping.

    ``client``: the requesting host's address (the packet's source). ``internal_client``: the
    address asked for (UPnP NewInternalClient; = client for NAT-PMP/PCP). ``external_port`` 0 =
    any. ``lease``: seconds; 0 = "permanent" -> ``max_lease``, renewed while in use.
    ``allow_alternative``: another external port may be granted (AddAnyPortMapping, PCP without
    PREFER_FAILURE, NAT-PMP). ``nonce``: the PCP mapping nonce (a different nonce may not touch
    the mapping).
    """

    protocol: FrontProtocol
    client: str
    internal_client: str
    internal_port: int
    external_port: int
    proto: Proto
    lease: float
    description: str = ""
    allow_alternative: bool = False
    nonce: bytes | None = None

    def problem(self) -> str | None:
        """What is wrong with the request's fields (None: nothing): addresses that are not IP
        addresses, a port or a lease out of range."""
        for text in (self.client, self.internal_client):
            with contextlib.suppress(ValueError):
                ipaddress.ip_address(text)
                continue
            return f"{text!r} is not an IP address"
        if not 1 <= self.internal_port <= 65535:
            return f"internal port {self.internal_port} is outside 1-65535"
        if not 0 <= self.external_port <= 65535:
            return f"external port {self.external_port} is outside 0-65535"
        if not (math.isfinite(self.lease) and self.lease >= 0):
            return f"lease {self.lease!r} is not a number of seconds"
        return None


@dataclass(frozen=True, slots=True)
class Grant:
    """What was granted: the external port (may differ from the one asked when alternatives
    were allowed), the lease told in seconds, the upstream router's external address ("")."""

    external_port: int
    lease: float
    external_address: str


class RefusalKind(enum.StrEnum):
    """Why a request was refused; each protocol maps it onto its own codes:

    ============== ======= ======= =========================
    kind           UPnP    NAT-PMP PCP
    ============== ======= ======= =========================
    NOT_AUTHORIZED 606     2       NOT_AUTHORIZED
    OTHER_CLIENT   718     2       NOT_AUTHORIZED
    CONFLICT       718     4       CANNOT_PROVIDE_EXTERNAL
    NO_RESOURCES   728     4       NO_RESOURCES
    UPSTREAM       501     3       NETWORK_FAILURE
    NO_SUCH        714     (ok)    (ok)
    ============== ======= ======= =========================

    OTHER_CLIENT answers 718 as miniupnpd does in secure mode (miniupnpd/upnpsoap.c).
    """

    NOT_AUTHORIZED = "not_authorized"
    OTHER_CLIENT = "other_client"
    CONFLICT = "conflict"
    NO_RESOURCES = "no_resources"
    UPSTREAM = "upstream"
    NO_SUCH = "no_such"


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why not (``kind``: the protocols' codes; ``reason``: for a person and the log)."""
    kind: RefusalKind
    reason: str


@dataclass(slots=True)
class FrontMapping:
    """A mapping the front holds: the request that made it (its last renewal, with the
    external port granted), the grant, when it was created and last in use and when its lease
    ends (service clock, seconds; ``inf`` for lease 0: renewed while in use), and the id of the
    activation carrying it."""

    request: ClientRequest
    grant: Grant
    created: float
    last_use: float
    lease_end: float = math.inf
    activation_id: str = ""

    def to_json(self, now: float) -> dict[str, Any]:
        """For status (``idle``/``lease_left``: seconds at ``now``)."""
        r = self.request
        return {"protocol": r.protocol.value, "client": r.client,
                "internal_client": r.internal_client, "internal_port": r.internal_port,
                "external_port": self.grant.external_port, "proto": r.proto.value,
                "lease_asked": r.lease, "lease": self.grant.lease,
                "lease_left": None if math.isinf(self.lease_end)
                else round(max(0.0, self.lease_end - now), 3),
                "idle": round(max(0.0, now - self.last_use), 3),
                "description": r.description, "activation": self.activation_id}


class Forwarder(Protocol):
    """Topology 1 (igdtrigger is the LAN's gateway): the inner DNAT from our own upstream address
    to the client (``front/dnat.py``). The upstream mapping then points at
    :meth:`upstream_address`, which a secure-mode ISP router accepts."""

    def upstream_address(self) -> str | None:
        """Our own address towards the upstream router (None: not known yet)."""

    async def add(self, proto: Proto, external_port: int, client: str,
                  internal_port: int) -> None:
        """Forward ``external_port`` to ``client:internal_port``."""

    async def remove(self, proto: Proto, external_port: int) -> None:
        """Forward ``external_port`` no more."""


@dataclass
class FrontTrace:
    """The front's own steps of one granted add, when ``IGDTRIGGER_TRACE`` is on (a debug aid).

    The mapper's line for the same add (core/trace.py) runs from the request's arrival
    (``pmp``: a NAT-PMP/PCP datagram read; ``soap``: a UPnP control request entered) through
    ``front`` (the manager began the mapping), ``upstream_address`` (topology 1's own address
    known), ``dnat`` (the inner DNAT rule in) to the router's answer; this line runs from
    ``front`` to ``activated`` (the service answered: its scheduler round is over) and
    ``granted``."""

    steps: list[tuple[str, int]] = field(
        default_factory=lambda: [("front", time.perf_counter_ns())])

    def stamp(self, what: str) -> None:
        """Mark a step now."""
        self.steps.append((what, time.perf_counter_ns()))

    def write(self) -> None:
        """Append ``{"front": [[step, ms after the first], ...]}`` to the trace file."""
        self.stamp("granted")
        path = os.environ.get(TRACE_ENV)
        if not path:
            return
        t0 = self.steps[0][1]
        line = {"front": [[what, round((ns - t0) / 1e6, 4)] for what, ns in self.steps]}
        with contextlib.suppress(OSError), open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(line) + "\n")
