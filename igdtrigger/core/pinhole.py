"""IPv6 pinhole values shared by the pinhole keeper (runtime) and the UPnP firewall client.

Pure data, no I/O. The keeper works with what the router's ``WANIPv6FirewallControl:1`` service
reported (``FirewallInfo``) and within the lease bounds that service defines, without naming the
UPnP backend that talks to it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PINHOLE_MAX_LEASE", "FirewallInfo"]

PINHOLE_MAX_LEASE = 86400  # s: WANIPv6FirewallControl LeaseTime is 1..86400 (IGDv2 spec)


@dataclass(frozen=True, slots=True)
class FirewallInfo:
    """What the router's IPv6 firewall service said when it was found."""

    location: str  # the description it was found in
    control_url: str  # the service's control URL, host replaced by the router's IPv6 address
    connect_to: str  # that address as connected to (with its %zone when link-local)
    enabled: bool  # GetFirewallStatus: FirewallEnabled
    inbound_allowed: bool  # GetFirewallStatus: InboundPinholeAllowed
