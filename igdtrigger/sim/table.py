"""The simulated router's mapping table and behaviour knobs (sans-I/O, clock-injected).

``MappingTable`` holds the entries, the options that make it behave like a given router
(miniupnpd by default; MikroTik, ARRIS, old DD-WRT, ... by knob) and the checks every add goes
through (arguments, permissions, lease policy, table size). The IGD actions that use it are
``igdtrigger.sim.device.SimulatedRouter``; the network plumbing ``igdtrigger.sim.router``.
"""

from __future__ import annotations

import collections
import ipaddress
import math
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from igdtrigger.core.model import Proto, RouterMapping
from igdtrigger.gateway.base import counts_as_public
from igdtrigger.gateway.upnp.codec import UpnpFault

if TYPE_CHECKING:
    from igdtrigger.sim.device import HttpResponse, SimulatedRouter

__all__ = [
    "DEFAULT_SERVER_HEADER", "DIGITS", "MAX_LEASE_V2", "SIMULATED_EXTERNAL", "ActionRecord",
    "FaultStyle", "LeaseMode", "MappingTable", "Refused", "normalise_ip", "same_ip", "spiral",
]

LeaseMode = Literal["normal", "permanent_only_725", "permanent_only_402", "drops_timed"]
FaultStyle = Literal["standard", "mikrotik"]
_LEASE_MODES = ("normal", "permanent_only_725", "permanent_only_402", "drops_timed")
_FAULT_STYLES = ("standard", "mikrotik")
DIGITS = re.compile(r"\d{1,10}", re.ASCII)

MAX_LEASE_V2 = 604800  # one week: IGDv2's ceiling, and what miniupnpd grants for lease 0
DEFAULT_SERVER_HEADER = "Linux/6.1 UPnP/1.1 igdtrigger-simulated/1.0"
SIMULATED_EXTERNAL = "203.0.113.4"
"""The simulator's external address: a documentation address (RFC 5737 TEST-NET-3) that it
reports as its public one: its description names it ``X_publicStandIn``
(``gateway.base.counts_as_public``)."""


@dataclass(frozen=True, slots=True)
class ActionRecord:
    """One SOAP action the router answered (for tests and the demo)."""

    at: float
    requester: str
    action: str
    args: Mapping[str, str]
    error_code: int | None  # None = success


@dataclass(slots=True)
class _Entry:
    proto: Proto
    external_port: int
    internal_client: str
    internal_port: int
    description: str
    remote_host: str
    lease: int  # granted, 0 = permanent
    expires_at: float | None  # None = permanent
    unseen: int = 0  # late_visible: look-ups still answered 714


@dataclass(slots=True)
class _ArmedFailure:
    code: int
    description: str
    remaining: int
    action: str | None


class Refused(Exception):
    """A SOAP fault the simulated router answers with (UPnP error ``code``)."""
    def __init__(self, code: int, description: str | None = None) -> None:
        super().__init__(code)
        self.fault = UpnpFault.of(code, description)


def normalise_ip(text: str) -> str:
    """``text`` as a canonical IP address (zone dropped); unchanged when it is not one."""
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return text
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def same_ip(a: str, b: str) -> bool:
    """Are ``a`` and ``b`` the same address?"""
    return normalise_ip(a) == normalise_ip(b)


def spiral(start: int, low: int, high: int) -> Iterator[int]:
    """start, start+1, start-1, start+2, start-2 ... within [low, high] (miniupnpd's search)."""
    yield start
    for step in range(1, high - low + 1):
        up, down = start + step, start - step
        if up > high and down < low:
            return
        if up <= high:
            yield up
        if down >= low:
            yield down


class MappingTable:
    """The mapping table and behaviour knobs of a miniupnpd-like IGD. No I/O, no threads.

    Every option is also a plain attribute, so a test can flip a knob between two requests.

    Options:
        igd_version: 2 (default; ``WANIPConnection:2``) or 1.
        external_ip: what GetExternalIPAddress reports; a private or shared address (or "")
            simulates double NAT / CGNAT.
        refuse_private_wan: act like a default miniupnpd whose WAN address is not public:
            GetExternalIPAddress answers "" and AddPortMapping fails with 501.
        secure_mode: InternalClient must be the requester (606 on IGDv2, 718 on IGDv1).
        allow_low_ports: permit external/internal ports below 1024 (else 606 v2 / 718 v1).
        max_mappings: table size; a new mapping beyond it fails with 728 (v2) / 501 (v1).
        lease_mode: "normal"; "permanent_only_725" (MikroTik: non-zero lease -> 725);
            "permanent_only_402" (ARRIS: non-zero lease -> 402); "drops_timed" (old DD-WRT: a
            timed lease is accepted but the mapping is gone at once). In the quirk modes lease 0
            stays permanent, even on IGDv2.
        fault_style: "standard" (miniupnpd) or "mikrotik" (``faultCode``/``faultString``).
        latency: seconds the server waits before each answer.
        connection_status: what GetStatusInfo reports ("Connected", "Disconnected", ...).
        clock: monotonic seconds; inject a fake one to expire leases without sleeping.
        seed: seeds AddAnyPortMapping's random port choice and the device UUID.
        server_header: the ``Server:`` header the HTTP layer sends.

    Router-truth quirks (answers that are not what happened; router-facts.md §10), plain
    attributes set after construction:
        full_fault: the error code a full table answers AddPortMapping with (default 728 on
            IGDv2, 501 on IGDv1); 402 like the IGDv1 router of miniupnp/miniupnp#92.
        unreadable: AddPortMapping succeeds and installs the mapping, but
            GetSpecificPortMappingEntry answers 714 and the listing is empty; every add appends
            another copy and each DeletePortMapping removes one (miniupnpd 2.3.0-2.3.3 pf
            backend, miniupnp/miniupnp#719). ``mappings()`` shows the copies.
        forced_lease: every mapping gets this lease whatever is asked (Technicolor,
            miniupnp/miniupnp#398); GetSpecificPortMappingEntry reports it.
        delete_noop: DeletePortMapping answers success and leaves the mapping.
        lease_cap: the longest lease granted (a longer or a 0 ask gets this one, silently);
            GetSpecificPortMappingEntry reports it counting down.
        refresh_conflict: re-adding a mapping the requester already holds answers 718 and does
            not refresh its lease (lontivero/Open.NAT#14; old Tomato miniupnpd did not refresh,
            miniupnp/miniupnp#131).
        deletes_ignored: the first this-many DeletePortMapping of each mapping answer success
            and leave it (a delete that works only on a later try).
        description_limit: descriptions are stored cut to this many characters (the table
            shows the cut text).
        late_visible: a new mapping is installed a moment after the add is answered: the
            first this-many GetSpecificPortMappingEntry look-ups of it answer 714.
    """

    def __init__(
        self,
        *,
        igd_version: int = 2,
        external_ip: str = SIMULATED_EXTERNAL,
        refuse_private_wan: bool = False,
        secure_mode: bool = False,
        allow_low_ports: bool = False,
        max_mappings: int = 1024,
        lease_mode: LeaseMode = "normal",
        fault_style: FaultStyle = "standard",
        latency: float = 0.0,
        connection_status: str = "Connected",
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
        server_header: str = DEFAULT_SERVER_HEADER,
        friendly_name: str = "igdtrigger simulated router",
        log_size: int = 256,
    ) -> None:
        if igd_version not in (1, 2):
            raise ValueError(f"igd_version must be 1 or 2, not {igd_version!r}")
        if lease_mode not in _LEASE_MODES:
            raise ValueError(f"lease_mode must be one of {', '.join(_LEASE_MODES)}")
        if fault_style not in _FAULT_STYLES:
            raise ValueError(f"fault_style must be one of {', '.join(_FAULT_STYLES)}")
        if max_mappings < 0:
            raise ValueError("max_mappings must be 0 or more")
        if latency < 0:
            raise ValueError("latency must be 0 or more seconds")
        self.igd_version = igd_version
        self.external_ip = external_ip
        self.refuse_private_wan = refuse_private_wan
        self.secure_mode = secure_mode
        self.allow_low_ports = allow_low_ports
        self.max_mappings = max_mappings
        self.lease_mode: LeaseMode = lease_mode
        self.fault_style: FaultStyle = fault_style
        self.description_override: bytes | None = None
        self.latency = latency
        self.connection_status = connection_status
        self.server_header = server_header
        self.friendly_name = friendly_name
        self.action_hook: Callable[[str, Mapping[str, str]], UpnpFault | None] | None = None
        """Called before each action; a returned fault is the answer (``None`` = carry on)."""

        # -- backend-contract quirks (issue 11, gateway side) --
        self.first_wan: SimulatedRouter | None = None
        """Multi-WAN (tailscale#8364): a WANDevice listed *before* this one, with its own
        WANIPConnection at ``FIRST_WAN_CONTROL_PATH`` and its own table (``add_first_wan``)."""
        self.http_hook: Callable[[str], HttpResponse | None] | None = None
        """Called with the SOAP action name before it is answered; a returned response is sent
        as it is (a bare HTTP 400, an HTML error page...)."""

        self._clock = clock
        self._rng = random.Random(seed)  # noqa: S311 - port choice and a UUID, not secrets
        self.udn = f"uuid:{uuid.UUID(int=self._rng.getrandbits(128), version=4)}"
        self._table: dict[tuple[Proto, int], _Entry] = {}
        self._armed: list[_ArmedFailure] = []
        self._started_at = clock()
        self.boot_count = 1
        self.calls: collections.Counter[str] = collections.Counter()
        """SOAP actions received, by action name (failed ones included)."""
        self.errors: collections.Counter[int] = collections.Counter()
        """Faults answered, by UPnP error code."""
        self.http_requests: collections.Counter[str] = collections.Counter()
        """HTTP requests by ``"METHOD /path"``."""
        self.log: collections.deque[ActionRecord] = collections.deque(maxlen=log_size)

        # --- router-truth quirks (issue 11, verifying effects; see the class docstring) -----
        self.full_fault: int | None = None
        self.unreadable = False
        self.forced_lease: int | None = None
        self.delete_noop = False
        self.lease_cap: int | None = None
        self.refresh_conflict = False
        self.deletes_ignored = 0
        self.description_limit: int | None = None
        self.late_visible = 0
        self.reported_client: str | None = None
        """GetSpecificPortMappingEntry reports this internal client for every entry (a router
        whose record says another host than the one it maps to)."""
        self.service_name = "WANIPConnection"
        """The WAN connection service's type name: "WANPPPConnection" for a PPPoE line (same
        actions, router-facts §3.3; use with igd_version 1: there is no WANPPPConnection:2)."""
        self._ignored: collections.Counter[tuple[Proto, int]] = collections.Counter()
        self._hidden: list[_Entry] = []  # unreadable: installed copies the router cannot show

    @property
    def uptime(self) -> int:
        """Seconds since the router (re)started."""
        return max(0, int(self._clock() - self._started_at))

    def mappings(self) -> list[RouterMapping]:
        """The live table, in insertion order, with remaining leases (0 = permanent); with
        ``unreadable``, the copies the router installed but does not report."""
        now = self._expire()
        return [
            RouterMapping(
                e.proto,
                e.external_port,
                e.internal_client,
                e.internal_port,
                e.description,
                True,
                self._remaining(e, now),
            )
            for e in (*self._table.values(), *self._hidden)
        ]

    # -- control ---------------------------------------------------------------------------------

    def fail_next(
        self,
        code: int,
        n: int = 1,
        *,
        action: str | None = None,
        description: str | None = None,
    ) -> None:
        """Answer the next ``n`` SOAP actions (only ``action`` ones, if given) with a fault."""
        if n < 1:
            raise ValueError("n must be at least 1")
        self._armed.append(_ArmedFailure(code, UpnpFault.of(code, description).description, n,
                                         action))

    def restart(self) -> None:
        """A daemon restart: the table is gone, uptime starts again, armed failures are dropped.

        The counters and the log are kept (call ``reset_counters``). Moving to a new HTTP port is
        the server's part (``SimulatedIgdServer.restart``).
        """
        self._table.clear()
        self._hidden.clear()
        self._armed.clear()
        self._started_at = self._clock()
        self.boot_count += 1

    def reset_counters(self) -> None:
        """Clear the call, error, HTTP and log records (not the table)."""
        self.calls.clear()
        self.errors.clear()
        self.http_requests.clear()
        self.log.clear()

    def clear(self) -> None:
        """Delete every mapping (like an administrator flushing the table)."""
        self._table.clear()
        self._hidden.clear()

    def _take_armed(self, action: str) -> UpnpFault | None:
        for armed in self._armed:
            if armed.action is None or armed.action == action:
                armed.remaining -= 1
                if armed.remaining <= 0:
                    self._armed.remove(armed)
                return UpnpFault(armed.code, armed.description)
        return None


    def _expire(self) -> float:
        now = self._clock()
        dead = [
            k for k, e in self._table.items() if e.expires_at is not None and now >= e.expires_at
        ]
        for key in dead:
            del self._table[key]
        self._hidden = [e for e in self._hidden if e.expires_at is None or now < e.expires_at]
        return now

    @staticmethod
    def _remaining(entry: _Entry, now: float) -> int:
        if entry.expires_at is None:
            return 0
        return max(0, math.ceil(entry.expires_at - now))

    def _reported_external_ip(self) -> str:
        ip = self.external_ip.strip()
        private = self.refuse_private_wan and not counts_as_public(ip, SIMULATED_EXTERNAL)
        if ip == "0.0.0.0" or private:
            return ""
        return ip

    @staticmethod
    def _port_arg(args: Mapping[str, str], name: str) -> int:
        text = args.get(name, "").strip()
        if not DIGITS.fullmatch(text) or int(text) > 65535:
            raise Refused(402)
        return int(text)

    @staticmethod
    def _proto_arg(args: Mapping[str, str]) -> Proto:
        text = args.get("NewProtocol", "").strip().upper()
        if text not in ("TCP", "UDP"):
            raise Refused(402)
        return Proto(text)

    @staticmethod
    def _client_arg(args: Mapping[str, str], requester: str, *, required: bool) -> str:
        if "NewInternalClient" not in args and required:
            raise Refused(402)
        text = args.get("NewInternalClient", "").strip()
        if not text:
            return requester
        try:
            return str(ipaddress.IPv4Address(text))
        except ValueError:
            raise Refused(402) from None

    def _grant_lease(self, args: Mapping[str, str]) -> int:
        text = args.get("NewLeaseDuration", "").strip() or "0"
        if not DIGITS.fullmatch(text) or int(text) > 0xFFFFFFFF:
            raise Refused(402)
        requested = int(text)
        if self.lease_mode == "permanent_only_725" and requested:
            raise Refused(725)
        if self.lease_mode == "permanent_only_402" and requested:
            raise Refused(402)
        if self.forced_lease is not None:
            return self.forced_lease
        if self.lease_cap is not None and (requested == 0 or requested > self.lease_cap):
            return self.lease_cap
        v2_clamp = self.lease_mode == "normal" and self.igd_version >= 2
        if v2_clamp and (requested == 0 or requested > MAX_LEASE_V2):
            return MAX_LEASE_V2
        return requested

    def _authorise(self, client: str, requester: str, ext_port: int, int_port: int) -> None:
        denied = 606 if self.igd_version >= 2 else 718
        if self.secure_mode and not same_ip(client, requester):
            raise Refused(denied)
        low_ok = self.allow_low_ports
        if int_port == 0 or (not low_ok and (ext_port < 1024 or int_port < 1024)):
            raise Refused(denied)
        if self.refuse_private_wan and not counts_as_public(self.external_ip, SIMULATED_EXTERNAL):
            raise Refused(501)

    def _store(
        self,
        proto: Proto,
        ext_port: int,
        client: str,
        int_port: int,
        args: Mapping[str, str],
        lease: int,
    ) -> None:
        remote = args.get("NewRemoteHost", "").strip()
        key = (proto, ext_port)
        existing = self._table.get(key)
        if existing is not None and (
            existing.internal_client != client or existing.remote_host != remote
        ):
            raise Refused(718)
        if existing is not None and self.refresh_conflict:
            raise Refused(718)
        if existing is None and len(self._table) + len(self._hidden) >= self.max_mappings:
            raise Refused(self.full_fault or (728 if self.igd_version >= 2 else 501))
        now = self._clock()
        if lease == 0:
            expires_at: float | None = None
        elif self.lease_mode == "drops_timed":
            expires_at = now  # accepted, and gone by the next look
        else:
            expires_at = now + lease
        description = args.get("NewPortMappingDescription", "")
        if self.description_limit is not None:
            description = description[: self.description_limit]
        entry = _Entry(
            proto,
            ext_port,
            client,
            int_port,
            description,
            remote,
            lease,
            expires_at,
        )
        if self.unreadable:
            self._hidden.append(entry)  # installed, never reported; a re-add is one more
            return
        if existing is None:
            entry.unseen = self.late_visible
        self._table[key] = entry  # an update keeps its place in the generic list

    def _range_args(self, args: Mapping[str, str]) -> tuple[int, int, Proto, bool]:
        first = self._port_arg(args, "NewStartPort")
        last = self._port_arg(args, "NewEndPort")
        proto = self._proto_arg(args)
        manage_text = args.get("NewManage", "").strip().lower()
        if manage_text not in ("", "0", "1", "true", "false", "yes", "no"):
            raise Refused(402)
        if first > last:
            raise Refused(733)
        return first, last, proto, manage_text in ("1", "true", "yes")
