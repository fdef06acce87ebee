"""The one small interface every router protocol backend implements.

The mapper talks only to this. A backend owns its transport (miniupnpc in a worker thread, SOAP
over asyncio streams, NAT-PMP/PCP datagrams), serialises its requests so the router sees one at a
time, and translates every failure into ``igdtrigger.core.errors.GatewayError`` subclasses.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, runtime_checkable

from igdtrigger.core import trace
from igdtrigger.core.errors import ActionFailed, InvalidArgs, LeaseRefused, UnsupportedAction
from igdtrigger.core.model import MappingSpec, Proto, RouterMapping

__all__ = [
    "AddsIfFree", "AdoptsLeftovers", "Capability", "CheckedAdd", "Gateway", "GatewayInfo",
    "Granted", "OnCall", "RouterChange", "RouterChangeKind", "add_checked", "add_if_free",
    "add_with_lease_fallback", "counts_as_public", "is_public_address", "looked_up",
    "metered", "unsupported",
]

log = logging.getLogger("igdtrigger.gateway")
T = TypeVar("T")

OnCall = Callable[[str, float, bool], None]  # (action, seconds, ok), for metrics


async def metered(on_call: OnCall | None, action: str, request: Awaitable[T]) -> T:
    """Await one router request and report it to ``on_call`` (duration, success)."""
    t0 = time.perf_counter()
    ok = False
    try:
        result = await request
        ok = True
        return result
    finally:
        if on_call is not None:
            on_call(action, time.perf_counter() - t0, ok)


class Capability(enum.StrEnum):
    """Optional operations a connected gateway offers (``Gateway.capabilities``)."""

    ADD_ANY = "add-any"  # add_any(): the router picks a free external port (IGDv2, NAT-PMP, PCP)
    LIST = "list"  # list(): the router reports its whole table (UPnP)
    PINHOLES = "pinholes"  # the IGD offers WANIPv6FirewallControl (see gateway.pinhole)


@dataclass(frozen=True, slots=True)
class GatewayInfo:
    """What a backend learned when it connected."""

    protocol: str  # "upnp-igd", "nat-pmp", "pcp", "simulated"
    location: str  # description URL, or "ip:port" for datagram protocols
    local_address: str  # our address as the router sees it (the default internal client)
    external_address: str  # "" when the router does not know it
    service_type: str = ""  # e.g. urn:schemas-upnp-org:service:WANIPConnection:2
    server: str = ""  # router's self-description, when known
    notes: tuple[str, ...] = field(default_factory=tuple)
    control_url: str = ""  # UPnP: the chosen WAN connection service's control URL
    root_uuid: str = ""  # UPnP: UDN of the IGD's root device ("uuid:..."), for SSDP NOTIFYs
    backend: str = ""  # "miniupnpc", "soap", "nat-pmp", "pcp", "simulated", ...
    public_stand_in: str = ""  # a documentation address the device says stands for a public one

    @property
    def external_reachable(self) -> bool:
        """False when the external address is private/shared/unspecified: double NAT or CGNAT.
        A documentation address the device declared as its ``public_stand_in`` (the simulated
        router does) counts as public."""
        return counts_as_public(self.external_address, self.public_stand_in)

    @property
    def external_known(self) -> bool:
        """The router reports an external address (not empty, not 0.0.0.0)."""
        return self.external_address.strip() not in ("", "0.0.0.0", "::")

    @property
    def reachable_or_unknown(self) -> bool | None:
        """``external_reachable``, or None when the router reports no external address."""
        return self.external_reachable if self.external_known else None

    def external_warning(self) -> str | None:
        """What the external address says about reaching our ports (None: public). The one
        wording for status, the dashboard, ``gateway`` and the backends' logs: an address
        the router does not report is unknown, not "not public" (a mesh repeater answers
        empty, Netopia 0.0.0.0; miniupnpd answers empty when its own WAN is private)."""
        if self.external_reachable:
            return None
        if not self.external_known:
            return ("the router reports no external address (empty or 0.0.0.0): whether ports "
                    "opened here are reachable from the internet is unknown (miniupnpd reports "
                    "none when its own WAN address is private: double NAT)")
        return (f"external address {self.external_address.strip()} is not public: ports opened "
                "here are not reachable from the internet (double NAT or CGNAT)")


@dataclass(frozen=True, slots=True)
class Granted:
    """The router's answer to an add.

    ``external_port``: the port the router holds (ours, or its pick for add-any/NAT-PMP/PCP);
    ``lease``: seconds the router said it granted (0 = permanent; for UPnP, what we asked,
    since AddPortMapping answers nothing: read it back with ``get`` to learn a forced lease);
    ``requested``: the lease asked by the caller (``None``: not recorded);
    ``timed_lease_refused``: set when the router refused the timed lease asked and a lease-0
    retry succeeded (``add_with_lease_fallback``): the mapping is permanent and the caller
    must delete it itself; the error says how the router refused (725, or 402).
    """

    external_port: int
    lease: int
    requested: int | None = None
    timed_lease_refused: ActionFailed | None = None


async def add_with_lease_fallback(add_once: Callable[[int], Awaitable[Granted]],
                                  lease: int) -> Granted:
    """The one lease fallback every backend's ``add``/``add_any`` goes through.

    ``add_once(lease)`` makes one request. A timed add the router refuses with 725
    (``LeaseRefused``, MikroTik) or 402 (``InvalidArgs``, ARRIS NVG578LX; tailscale#15223) is
    retried once with lease 0. Only when that retry succeeds is the router refusing timed
    leases: the result carries ``timed_lease_refused``. When the retry fails too (a 402 because
    the table is full, miniupnp#92), its error is raised and nothing is concluded about leases.
    Whether to ask lease 0 straight away next time is the caller's decision (the mapper learns
    it per router).
    """
    try:
        granted = await add_once(lease)
    except (LeaseRefused, InvalidArgs) as refused:
        if lease == 0:
            raise
        log.debug("timed lease %ds refused (%s): retrying with lease 0", lease, refused)
        permanent = await add_once(0)
        return Granted(permanent.external_port, permanent.lease, lease, refused)
    if granted.requested is None:
        return Granted(granted.external_port, granted.lease, lease, granted.timed_lease_refused)
    return granted


@dataclass(frozen=True, slots=True)
class CheckedAdd:
    """The outcome of ``add_if_free`` (the check before an add, then the add): exactly one of

    ``granted``: the router had no entry for the port, and the add was made;
    ``held``: the router's entry for the port (nothing was added: the caller judges whose it
    is, and adds itself if it is its own);
    ``unchecked``: the router cannot look mappings up (401/602; nothing was added, nothing is
    known: the caller decides whether to add without a check).
    A failed lookup is none of these: it raises, and nothing was added."""

    granted: Granted | None = None
    held: RouterMapping | None = None
    unchecked: UnsupportedAction | None = None


class _Held(Exception):  # not an error: carries the entry out of the lease fallback
    def __init__(self, outcome: CheckedAdd) -> None:
        super().__init__("held")
        self.outcome = outcome


async def add_checked(job: Callable[[int], Awaitable[CheckedAdd]],
                      add_once: Callable[[int], Awaitable[Granted]], lease: int) -> CheckedAdd:
    """``add_if_free`` for a backend that runs the check and the add as one ``job(lease)``,
    through the one lease fallback (``add_with_lease_fallback``): the first try is ``job``; a
    timed lease refused is retried with ``add_once(0)`` alone (the check found the port free
    a moment before)."""
    tried = False

    async def once(asked: int) -> Granted:
        nonlocal tried
        if tried:
            return await add_once(asked)
        tried = True
        outcome = await job(asked)
        if outcome.granted is None:
            raise _Held(outcome)
        return outcome.granted

    try:
        return CheckedAdd(granted=await add_with_lease_fallback(once, lease))
    except _Held as held:
        return held.outcome


async def add_if_free(gateway: Gateway, spec: MappingSpec, lease: int) -> CheckedAdd:
    """The check before an add and the add, as one job: the router's entry for ``spec``'s port
    is looked up (``Gateway.get``, the one lookup: "no such entry" told from a failed request)
    and only when there is none is ``spec`` added (``Gateway.add``, its lease fallback
    included). A lookup that fails raises its ``GatewayError`` and nothing is added.

    A backend that can do both faster (``AddsIfFree``: the miniupnpc backend runs both back to
    back on its worker thread) does; elsewhere ``get`` then ``add``, back to back in this
    coroutine."""
    # getattr, not isinstance(gateway, AddsIfFree): a runtime protocol check costs ~10 us on
    # the way from a trigger to the router call
    own: Callable[[MappingSpec, int], Awaitable[CheckedAdd]] | None = getattr(
        gateway, "add_if_free", None)
    if own is not None:
        return await own(spec, lease)
    try:
        found: RouterMapping | UnsupportedAction | None = await gateway.get(
            spec.proto, spec.external_port)
    except UnsupportedAction as exc:
        found = exc
    return looked_up(found) or CheckedAdd(granted=await gateway.add(spec, lease))


def looked_up(found: RouterMapping | UnsupportedAction | None) -> CheckedAdd | None:
    """What the check before an add found (the router's entry, None: no such entry, or the
    router cannot look up): the outcome when nothing may be added, None when the add goes."""
    if trace.ON:
        trace.stamp("checked")
    if isinstance(found, UnsupportedAction):
        return CheckedAdd(unchecked=found)
    return None if found is None else CheckedAdd(held=found)


@runtime_checkable
class Gateway(Protocol):
    """A router that can hold port mappings."""

    @property
    def info(self) -> GatewayInfo | None:
        """What ``connect`` learned, or ``None`` before it succeeded."""
        ...

    async def connect(self) -> GatewayInfo:
        """Find or reconnect to the router; cheap when already connected."""
        ...

    @property
    def capabilities(self) -> frozenset[Capability]:
        """Optional operations the connected router offers (empty before ``connect``)."""
        ...

    async def add(self, spec: MappingSpec, lease: int) -> Granted:
        """Create or refresh a mapping. ``lease`` in seconds, 0 asks for a permanent one.

        Goes through ``add_with_lease_fallback``: a refused timed lease comes back as a
        permanent mapping with ``Granted.timed_lease_refused`` set."""
        ...

    async def add_any(self, spec: MappingSpec, lease: int) -> Granted:
        """Like ``add``, but the router may pick another external port when ours is taken
        (``Capability.ADD_ANY``; IGDv2 AddAnyPortMapping). ``Granted.external_port`` is the
        port it holds. Raises ``UnsupportedAction`` without the capability."""
        ...

    async def delete(self, proto: Proto, external_port: int) -> None:
        """Delete a mapping. Raises ``NoSuchMapping`` if the router has none."""
        ...

    async def get(self, proto: Proto, external_port: int) -> RouterMapping | None:
        """The router's entry for this port, or ``None``."""
        ...

    async def list(self) -> list[RouterMapping]:
        """Every mapping the router reports (bounded; ``Capability.LIST``). Raises
        ``UnsupportedAction`` for a protocol that cannot list (NAT-PMP, PCP)."""
        ...

    async def close(self) -> None:
        """Release sockets and threads. The mappings stay; the mapper deletes them first."""
        ...


@runtime_checkable
class AddsIfFree(Protocol):
    """A backend with its own, faster ``add_if_free`` (the function of that name is the one
    behaviour: every backend's must match it, ``tests/test_backend_contract.py``)."""

    async def add_if_free(self, spec: MappingSpec, lease: int) -> CheckedAdd:
        """The module function ``add_if_free``, on this backend."""
        ...


@runtime_checkable
class AdoptsLeftovers(Protocol):
    """A backend whose router cannot list its mappings (NAT-PMP, PCP): what an earlier run of
    ours left after a crash is deleted by taking it up from the journal first."""

    def use_nonce_key(self, key: bytes) -> None:
        """Derive PCP mapping nonces from this secret (kept across runs by the journal)."""
        ...

    def mapping_nonce(self, spec: MappingSpec) -> bytes:
        """The nonce a new mapping for ``spec`` is requested with (journaled with it); b""
        when there is none to record."""
        ...

    def adopt(self, spec: MappingSpec, nonce: bytes = b"") -> bool:
        """Make ``delete()`` reach a mapping an earlier run left (``nonce`` as journaled).
        False when this protocol cannot delete it from here."""
        ...


_NOT_PUBLIC = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
]


class RouterChangeKind(enum.StrEnum):
    """What an SSDP announcement says happened to the router (``upnp.ssdp.NotifyTracker``)."""

    RESTARTED = "restarted"  # new BOOTID, or back after a byebye: its mappings are probably gone
    MOVED = "moved"  # the IGD's description is at a new URL (new port after a reboot)
    LEAVING = "leaving"  # ssdp:byebye: going down


@dataclass(frozen=True, slots=True)
class RouterChange:
    """A change of the router seen from outside the mapping protocol: ``reason`` for the log,
    ``location`` the description URL it is at now."""

    kind: RouterChangeKind
    reason: str
    location: str


_DOCUMENTATION = [ipaddress.ip_network(n) for n in (
    "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")]


def counts_as_public(text: str, stand_in: str = "") -> bool:
    """:func:`is_public_address`, or ``text`` is the device's declared ``stand_in``: a
    documentation address (RFC 5737, RFC 3849) it reports in place of a public one. Only a
    test device declares one (the built-in simulated router, in its description); no real
    router is numbered from those ranges, so the claim cannot hide a double NAT."""
    if is_public_address(text):
        return True
    if not stand_in or text.strip() != stand_in.strip():
        return False
    try:
        addr = ipaddress.ip_address(stand_in.strip())
    except ValueError:
        return False
    return any(addr in net for net in _DOCUMENTATION)


def is_public_address(text: str) -> bool:
    """True for an IPv4 address that the internet can reach (miniupnpc's reserved list)."""
    try:
        addr = ipaddress.ip_address(text.strip())
    except ValueError:
        return False
    if addr.version == 6:
        return addr.is_global
    return not any(addr in net for net in _NOT_PUBLIC)


def unsupported(action: str, why: str) -> UnsupportedAction:
    """The error for an optional operation a gateway lacks (see ``Capability``)."""
    return UnsupportedAction(action, None, why)
