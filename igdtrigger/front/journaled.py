"""A front mapping as the journal keeps it: the activation's meta keys the front writes, and the
mapping rebuilt from them after a restart (:func:`from_activation`); with the lease arithmetic
both sides share (:func:`granted_lease`, :func:`told_lease`). Pure: no I/O, times passed in.
"""

from __future__ import annotations

import math

from igdtrigger.core.activation import Activation
from igdtrigger.core.frontconfig import FrontConfig
from igdtrigger.front.contract import ClientRequest, FrontMapping, FrontProtocol, Grant

__all__ = ["M_CLIENT", "M_DESC", "M_INTERNAL", "M_LEASE", "M_LEASE_END", "M_NONCE",
           "from_activation", "granted_lease", "told_lease"]

# activation meta keys (kept in the journal: a restart rebuilds the front's table from them)
M_CLIENT = "front_client"
M_INTERNAL = "front_internal"  # "<internal client> <internal port>" (the target is ours: DNAT)
M_DESC = "front_description"
M_LEASE = "front_lease"  # lease asked (s, "0" = permanent)
M_NONCE = "front_nonce"  # PCP nonce, hex
M_LEASE_END = "front_lease_end"  # wall-clock end of a timed lease


def granted_lease(settings: FrontConfig, lease: float) -> float:
    """The lease held for a client asking ``lease`` s: lease 0 -> ``max_lease`` (renewed
    while in use), else at least 1 s and at most ``max_lease``."""
    return settings.max_lease if lease == 0 else min(max(lease, 1.0), settings.max_lease)


def told_lease(settings: FrontConfig, lease: float, protocol: FrontProtocol) -> float:
    """The lifetime told for a mapping held ``lease`` s: for NAT-PMP/PCP at most
    ``idle_timeout`` (a client renews at half of it, RFC 6886 §3.3, RFC 6887 §11.2.1; told
    more, a live silent client renewed only after idle removal). UPnP: the lease."""
    return lease if protocol is FrontProtocol.UPNP else min(lease, settings.idle_timeout)


def from_activation(act: Activation, settings: FrontConfig, *, now: float,
                    wall: float) -> FrontMapping | None:
    """A journaled activation back as a front mapping (None: not one we wrote); ``now`` on
    the service clock, ``wall`` the wall clock (a timed lease's end is kept in wall time)."""
    meta = act.meta
    internal_client, _, iport_s = meta.get(M_INTERNAL, "").partition(" ")
    if (len(act.rule.open) != 1 or not iport_s.isdecimal() or M_CLIENT not in meta
            or internal_client != act.host or not 1 <= int(iport_s) <= 65535):
        return None
    rng = act.rule.open[0]
    try:
        asked = float(meta.get(M_LEASE, "0"))
        nonce = bytes.fromhex(meta[M_NONCE]) if M_NONCE in meta else None
        lease_end_wall = float(meta[M_LEASE_END]) if M_LEASE_END in meta else math.inf
    except ValueError:
        return None
    req = ClientRequest(protocol=FrontProtocol(act.source.value), client=meta[M_CLIENT],
                        internal_client=internal_client, internal_port=int(iport_s),
                        external_port=rng.first, proto=rng.proto, lease=asked,
                        description=meta.get(M_DESC, ""), nonce=nonce)
    lease_end = now + lease_end_wall - wall if math.isfinite(lease_end_wall) else math.inf
    grant = Grant(rng.first, told_lease(settings, granted_lease(settings, asked),
                                        req.protocol), "")
    return FrontMapping(request=req, grant=grant, created=act.created, last_use=now,
                        lease_end=lease_end, activation_id=act.id)
