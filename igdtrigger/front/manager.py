"""FrontManager: the one place a LAN client's port-mapping request becomes (or ends) an activation.

Every protocol server of the front (UPnP IGD, NAT-PMP, PCP) hands the manager a
:class:`ClientRequest` and answers its client with the :class:`Grant` or :class:`Refusal` it gets
back; the servers never touch the engine, the mapper or the router themselves.

Contract (shared with ``front/pcp.py``):

- :meth:`FrontManager.add` -> ``Grant | Refusal``; :meth:`FrontManager.delete` -> ``Refusal | None``
- :meth:`FrontManager.lookup`, :meth:`FrontManager.mappings` (what the front holds now)
- :meth:`FrontManager.external_address` (the UPSTREAM router's external address)
- :meth:`FrontManager.epoch` (seconds since the front started serving: the PMP/PCP epoch)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from igdtrigger.core.model import Proto

__all__ = [
    "ClientRequest",
    "FrontManager",
    "FrontMapping",
    "FrontProtocol",
    "Grant",
    "Refusal",
    "RefusalKind",
]


class FrontProtocol(enum.StrEnum):
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


@dataclass(frozen=True, slots=True)
class Grant:
    """What was granted: the external port (may differ from the one asked when alternatives
    were allowed), the lease in seconds, the upstream router's external address ("" unknown)."""

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
    kind: RefusalKind
    reason: str


@dataclass(slots=True)
class FrontMapping:
    """A mapping the front holds: the request that made it (last renewal), the grant, when it
    was created and last in use (service clock, seconds), and the activation carrying it."""

    request: ClientRequest
    grant: Grant
    created: float
    last_use: float
    expires: float
    activation_id: str = ""


class FrontManager:
    """Client requests -> activations (skeleton: the contract; implemented below it)."""

    async def add(self, req: ClientRequest) -> Grant | Refusal:
        raise NotImplementedError

    async def delete(self, protocol: FrontProtocol, client: str, external_port: int, proto: Proto,
                     nonce: bytes | None = None) -> Refusal | None:
        raise NotImplementedError

    def lookup(self, external_port: int, proto: Proto) -> FrontMapping | None:
        raise NotImplementedError

    def mappings(self) -> list[FrontMapping]:
        raise NotImplementedError

    async def external_address(self) -> str | None:
        raise NotImplementedError

    def epoch(self) -> int:
        raise NotImplementedError
