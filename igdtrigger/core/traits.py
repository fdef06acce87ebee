"""What igdtrigger has learned about one router by checking its answers (pure, no I/O).

A router's answer is a claim: a successful AddPortMapping may leave nothing behind (old DD-WRT
drops timed leases at once, tailscale/tailscale#18196), a mapping may be installed but never
reported (miniupnpd 2.3.0-2.3.3 pf backend, miniupnp/miniupnp#719), a successful delete may
leave the mapping open, and a 402 may mean "table full" rather than "timed leases refused"
(miniupnp/miniupnp#92). The mapper confirms effects where the router can report them and
records what it saw here; the journal keeps it per router (``router_identity``), so the next
start acts on it from the first mapping. Sources: shared/reference/router-facts.md §2.13, §10.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, fields
from typing import Any, Protocol

__all__ = ["NO_READBACK", "TRUST_AFTER", "RouterAddress", "RouterTraits", "router_identity"]

# Confirmations (read back after add / after delete) in a row before the router's word is taken
# without one; the periodic verification still checks every mapping.
TRUST_AFTER = 3
# Protocols whose answer is all there is: NAT-PMP/PCP cannot look mappings up.
NO_READBACK = frozenset({"nat-pmp", "pcp"})


class RouterAddress(Protocol):
    """Where a router was found (``gateway.base.GatewayInfo`` is one)."""

    @property
    def protocol(self) -> str:
        """The protocol it speaks: "upnp-igd", "nat-pmp", "pcp", "simulated"."""
    @property
    def location(self) -> str:
        """Its description URL, or "ip:port" for datagram protocols."""
    @property
    def external_address(self) -> str:
        """Its external address; "" when the router does not know it."""


def router_identity(info: RouterAddress) -> str:
    """The key a router's traits are kept under: protocol and host of its location (a router
    that restarts on a new HTTP port stays the same router), else its external address."""
    loc = info.location
    host = urllib.parse.urlsplit(loc).hostname if "://" in loc else loc.rsplit(":", 1)[0]
    if host:
        return f"{info.protocol}@{host}"
    return f"{info.protocol}@wan:{info.external_address}"


@dataclass(slots=True)
class RouterTraits:
    """Learned behaviour of one router. ``None`` = not yet known.

    reports_mappings: GetSpecificPortMappingEntry / the listing show what it accepted.
    keeps_timed: a mapping with a timed lease stays (False: it drops it at once; lease 0 used).
    permanent_only: timed adds are refused (725, or 402 where the lease-0 retry then worked).
    deletes_work: a delete it answers with success removes the mapping.
    forced_lease: the lease it reports when it sets its own (0 = permanent), if not ours.
    lease_cap: the longest lease it grants, in seconds, when it silently grants less than asked
        (a renewal at half the asked lease would come after the mapping is gone).
    description_cut: the length it cuts NewPortMappingDescription to (its record of our
        mapping then shows a prefix of our description).
    """

    identity: str = ""
    reports_mappings: bool | None = None
    keeps_timed: bool | None = None
    permanent_only: bool = False
    deletes_work: bool | None = None
    forced_lease: int | None = None
    lease_cap: int | None = None
    description_cut: int | None = None
    # per run, not persisted: confirmations in a row
    adds_confirmed: int = 0
    deletes_confirmed: int = 0

    _PERSISTED = ("reports_mappings", "keeps_timed", "permanent_only", "deletes_work",
                  "forced_lease", "lease_cap", "description_cut")
    _COUNTS = frozenset({"forced_lease", "lease_cap", "description_cut"})

    @property
    def timed_leases(self) -> bool:
        """Ask for timed leases (else lease 0, deleted by us when the trigger lapses)."""
        return not self.permanent_only and self.keeps_timed is not False

    @property
    def why_permanent(self) -> str:
        """Why mappings are asked permanent (lease 0), for status; "" when they are not."""
        if self.permanent_only:
            return "router refuses timed leases"
        if self.keeps_timed is False:
            return "router drops timed leases at once"
        return ""

    def confirm_adds(self) -> bool:
        """Whether the next add should be read back."""
        return self.reports_mappings is not False and self.adds_confirmed < TRUST_AFTER

    def confirm_deletes(self) -> bool:
        """Whether the next delete should be confirmed by a look-up."""
        return self.reports_mappings is not False and (
            self.deletes_work is not True or self.deletes_confirmed < TRUST_AFTER)

    def to_json(self) -> dict[str, Any]:
        """The identity and every persisted trait, for status (``None`` = not yet known)."""
        return {name: getattr(self, name) for name in ("identity", *self._PERSISTED)}

    def persisted(self) -> dict[str, Any]:
        """What the journal keeps for this router (``restore`` reads it back)."""
        return {name: getattr(self, name) for name in self._PERSISTED}

    @classmethod
    def restore(cls, identity: str, data: dict[str, Any]) -> RouterTraits:
        """From the journal's record; unknown or mistyped fields are ignored."""
        out = cls(identity=identity)
        known = {f.name for f in fields(cls)}
        for name in cls._PERSISTED:
            value = data.get(name)
            if name not in known or value is None:
                continue
            if name in cls._COUNTS:
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    setattr(out, name, value)
            elif isinstance(value, bool):
                setattr(out, name, value)
        return out
