"""Make the kernel track the flows the conntrack detector needs: igdtrigger's own nftables table.

Why
---
Conntrack only tracks a network namespace's connections once something there needs it: NAT, an
nftables rule with a ``ct`` expression, an iptables ``-m conntrack``/``-m state`` rule. A desktop
with no firewall rule has none of these, so its outbound traffic never becomes a conntrack
new-flow event and a trigger rule would never fire. The service therefore loads one small table
of its own, ``table inet igdtrigger``, whose chains count new flows to the configured trigger
ports (``output`` for this host's own traffic, ``forward`` for a LAN routed through it) and to
the rules' opened ports (``prerouting``, inbound). Loading any rule with a ``ct`` expression
makes the kernel register its connection-tracking hooks for the table's family (``inet``: IPv4
and IPv6; ``nf_ct_netns_get`` in net/netfilter/nft_ct.c), so from then on every flow of the
namespace is tracked and the trigger flows are announced. The chains have policy ``accept`` and
no verdict: they never drop, accept or alter a packet, and a packet still meets every other
table's chains (nftables evaluates each base chain on a hook). The user's own tables are never
read or written; only ``inet igdtrigger`` is.

The table is replaced atomically (one ``nft -f -`` transaction: add, delete, define) at start,
which also replaces a table left by a crashed run, and when the rules change; it is deleted at a
clean stop. A table that disappears while the service runs (``nft flush ruleset`` from a
firewall reload) is put back by the service's periodic check (:meth:`KernelTracking.check`).

Side effect, said plainly: while the table exists the kernel tracks every connection of the
namespace (one conntrack entry per flow, bounded by ``net.netfilter.nf_conntrack_max``), exactly
as on any machine with a stateful firewall. ``[detect] track_flows = false`` turns this off;
then the conntrack detector only sees what the machine's own rules make the kernel track.

:func:`probe_events` checks the other half: that conntrack *events* reach a listener here. It
sends one UDP datagram over loopback to a socket of its own and waits for the kernel to announce
that flow.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from igdtrigger.core.model import PortRange, Proto
from igdtrigger.detect import nftnetlink
from igdtrigger.detect.ctnetlink import (
    NETLINK_NETFILTER,
    NF_NETLINK_CONNTRACK_NEW,
    ConntrackParser,
    Wanted,
)
from igdtrigger.nftcmd import NftResult, Runner, find_nft, nft_why, run_nft

__all__ = [
    "TABLE",
    "KernelTracking",
    "Visibility",
    "merge_ranges",
    "probe_events",
    "remove_script",
    "ruleset",
]

log = logging.getLogger(__name__)

TABLE = "inet igdtrigger"
"""The only nftables table igdtrigger creates, changes or deletes (``family name``)."""

_CHAINS = (("trigger_out", "output", True), ("trigger_fwd", "forward", True),
           ("open_in", "prerouting", False))

Probe = Callable[[float, "Wanted | None"], "bool | None"]


@dataclass(frozen=True, slots=True)
class Visibility:
    """Whether the conntrack detector can see trigger flows here, and the sentence saying why.

    ``seen`` is True only when the kernel is known to track them (our table is loaded) or an
    event was actually observed; never on the mere fact that the netlink socket opened."""

    seen: bool
    text: str


def merge_ranges(ranges: Iterable[PortRange]) -> dict[Proto, list[tuple[int, int]]]:
    """Per protocol, the union of ``ranges`` as sorted, disjoint, non-adjacent ``(first, last)``
    pairs (nft refuses overlapping intervals in one set)."""
    by_proto: dict[Proto, list[tuple[int, int]]] = {}
    for rng in ranges:
        by_proto.setdefault(rng.proto, []).append((rng.first, rng.last))
    out: dict[Proto, list[tuple[int, int]]] = {}
    for proto in sorted(by_proto, key=lambda p: p.value):
        merged: list[tuple[int, int]] = []
        for first, last in sorted(by_proto[proto]):
            if merged and first <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], last))
            else:
                merged.append((first, last))
        out[proto] = merged
    return out


def _set(pairs: list[tuple[int, int]]) -> str:
    return "{ " + ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in pairs) + " }"


def remove_script() -> str:
    """An ``nft -f`` script deleting our table; succeeds whether or not it exists."""
    return f"table {TABLE} {{}}\ndelete table {TABLE}\n"


def ruleset(trigger: Iterable[PortRange], opened: Iterable[PortRange], *,
            track_all: bool = False) -> str:
    """The ``nft -f`` script that (re)defines ``table inet igdtrigger`` atomically.

    ``trigger``: outbound destination ports whose new flows must be tracked (hooks ``output``
    and ``forward``); ``opened``: inbound destination ports (hook ``prerouting``). Each rule is
    ``<proto> dport { ports } ct state new counter``: the ``ct`` expression is what turns
    tracking on, the counter tells how many such flows the kernel saw. ``track_all`` (the IGD
    front: its clients' ports are not known in advance) adds chain ``all_flows`` with one
    ``ct state new counter`` rule, so the kernel tracks even with no trigger port; its counter
    is not a trigger count.
    """
    ports = {True: merge_ranges(trigger), False: merge_ranges(opened)}
    lines = [remove_script().rstrip("\n"), f"table {TABLE} {{"]
    for chain, hook, is_trigger in _CHAINS:
        lines.append(f"    chain {chain} {{")
        lines.append(f"        type filter hook {hook} priority 0; policy accept;")
        for proto, pairs in ports[is_trigger].items():
            lines.append(f"        {proto.value.lower()} dport {_set(pairs)} ct state new counter")
        lines.append("    }")
    if track_all:
        lines += ["    chain all_flows {", "        type filter hook output priority 0; "
                  "policy accept;", "        ct state new counter", "    }"]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _netlink_why(exc: OSError) -> str:
    if exc.errno in (errno.EPERM, errno.EACCES):
        return ("not allowed to load nftables rules (needs CAP_NET_ADMIN: run as root or "
                "with AmbientCapabilities=CAP_NET_ADMIN)")
    return (f"no nft command, and nf_tables netlink refused the table "
            f"({exc.strerror or exc or type(exc).__name__}); install nftables")


class KernelTracking:
    """Keeps ``table inet igdtrigger`` in place while the service runs (blocking calls: run
    them in a thread from async code).

    With the ``nft`` command the table counts new flows per trigger port (:func:`ruleset`);
    without it (``netlink=True``) a tracking-only table is written over nf_tables netlink
    (:mod:`.nftnetlink`: same name, same life cycle, no per-port counters).

    Attributes: ``installed`` (the table is loaded as we defined it), ``reason`` (why not, a
    sentence a person can act on; empty when installed), ``reinstalls`` (times it was found
    missing and put back), ``script`` (the ruleset last loaded), ``via`` ("nft", "netlink").
    """

    def __init__(self, *, enabled: bool = True, nft: str | None = None,
                 runner: Runner | None = None, probe: Probe | None = None,
                 netlink: bool = True) -> None:
        self.enabled = enabled
        self.nft = nft if nft is not None else find_nft()
        self.runner: Runner = runner or run_nft
        self.probe: Probe = probe or probe_events
        self.netlink = netlink
        self.installed = False
        self.reason = "not installed yet"
        self.reinstalls = 0
        self.script = ""
        self.via = ""

    @property
    def available(self) -> bool:
        """Can a table be loaded at all here (nft, or netlink allowed)?"""
        return self.nft is not None or self.netlink

    def _load(self, script: str) -> str:
        """Load ``script`` (nft) or the netlink table; the reason it failed, or ""."""
        if self.nft is not None:
            result = self.runner([self.nft, "-f", "-"], script)
            self.via = "nft"
            if result.returncode == 0:
                return ""
            why = nft_why(result)
            if not self.netlink or why.startswith("not allowed"):
                return why
            log.warning("nft could not load table %s (%s); writing it over netlink", TABLE, why)
        elif not self.netlink:
            return ("the nft command is missing (install nftables), so igdtrigger cannot "
                    "make the kernel track connections")
        self.via = "netlink"
        try:
            nftnetlink.load_table(TABLE.split()[1])
        except OSError as exc:
            return _netlink_why(exc)
        return ""

    def _netlink_mode(self) -> bool:
        return self.via == "netlink" or (self.nft is None and self.netlink)

    def _delete(self) -> str:
        if self.nft is not None and not self._netlink_mode():
            result = self.runner([self.nft, "-f", "-"], remove_script())
            return nft_why(result) if result.returncode != 0 else ""
        if not self.netlink:
            return "no nft command"
        try:
            nftnetlink.delete_table(TABLE.split()[1])
        except OSError as exc:
            return _netlink_why(exc)
        return ""

    def install(self, trigger: Sequence[PortRange], opened: Sequence[PortRange], *,
                track_all: bool = False) -> bool:
        """Load (or replace) the table for these ports. True when it is in place; else
        ``reason`` says why. With no trigger port and no ``track_all`` (the IGD front) there is
        nothing to track: the table is removed (one a crashed run left) and False returned."""
        if not trigger and not track_all:
            if self.available:
                self._delete()
            self.installed = False
            self.reason = "no rule has a trigger port"
            return False
        script = ruleset(trigger, opened, track_all=track_all)
        why = self._load(script)
        if why:
            self.installed = False
            self.reason = why
            log.warning("cannot load nftables table %s: %s", TABLE, why)
            return False
        self.installed, self.reason, self.script = True, "", script
        log.info("nftables table %s loaded (%s): the kernel tracks flows to the trigger ports%s",
                 TABLE, self.via, ", and every flow for the IGD front" if track_all else "")
        return True

    def establish(self, trigger: Sequence[PortRange], opened: Sequence[PortRange],
                  wanted: Wanted | None = None, probe_timeout: float = 1.0, *,
                  track_all: bool = False) -> Visibility:
        """Load the table (when enabled), else find out whether the kernel tracks anyway (a
        loopback probe): what the service reports for the conntrack detector."""
        if self.enabled:
            if self.install(trigger, opened, track_all=track_all):
                how = "" if self.via == "nft" else " over netlink (no nft command)"
                what = ("trigger flows" if not track_all else "every flow, for the IGD front"
                        if not trigger else "trigger flows and every flow, for the IGD front")
                return Visibility(True, f"the kernel tracks {what} (nftables table "
                                        f"{TABLE}, loaded by igdtrigger{how})")
            why = self.reason
        else:
            why = "[detect] track_flows = false"
        seen = self.probe(probe_timeout, wanted)
        if seen:
            return Visibility(True, "conntrack events verified by a loopback probe (this "
                                    f"machine's own rules make the kernel track flows; {why})")
        return Visibility(False, "listening, but the kernel does not track connections in this "
                                 f"network namespace, so no trigger flow is announced: {why}")

    def remove(self) -> None:
        """Delete the table if we loaded it (never any other table)."""
        if not self.installed:
            return
        why = self._delete()
        if why:
            log.warning("cannot delete nftables table %s: %s", TABLE, why)
            return
        self.installed = False
        self.reason = "removed at stop"

    def _list(self) -> NftResult | None:
        if self.nft is None:
            return None
        return self.runner([self.nft, "-j", "list", "table", *TABLE.split()], "")

    def present(self) -> bool:
        """Is our table loaded right now?"""
        if self._netlink_mode():
            try:
                return nftnetlink.table_exists(TABLE.split()[1])
            except OSError:
                return False
        result = self._list()
        return result is not None and result.returncode == 0

    def check(self) -> int | None:
        """The periodic check (one ``nft list``, or one netlink query): put the table back if
        something removed it (``nft flush ruleset`` in a firewall reload...); returns the new
        outbound trigger flows its counters saw, or None when unknown (not loaded, just put
        back, or loaded over netlink, which keeps no per-port counters)."""
        if not self.installed or not self.script:
            return None
        if self.via == "nft":
            result = self._list()
            if result is not None and result.returncode == 0:
                return _count(result.stdout)
        elif self.present():
            return None
        log.warning("nftables table %s was removed by someone else (a firewall reload or `nft "
                    "flush ruleset`?); loading it again so trigger flows stay tracked", TABLE)
        why = self._load(self.script)
        if why:
            self.installed = False
            self.reason = why
        else:
            self.reinstalls += 1
        return None

    def counted(self) -> int | None:
        """New outbound trigger flows the kernel counted in our chains, or None if unknown."""
        result = self._list()
        if result is None or result.returncode != 0:
            return None
        return _count(result.stdout)


def _count(listing: str) -> int | None:
    """Sum of the packet counters of our trigger chains in ``nft -j list table`` output."""
    try:
        items = json.loads(listing).get("nftables", [])
    except (ValueError, AttributeError):
        return None
    total = 0
    for item in items:
        rule = item.get("rule") if isinstance(item, dict) else None
        if not isinstance(rule, dict) or rule.get("chain") not in ("trigger_out", "trigger_fwd"):
            continue
        for expr in rule.get("expr", []):
            counter = expr.get("counter") if isinstance(expr, dict) else None
            if isinstance(counter, dict) and isinstance(counter.get("packets"), int):
                total += counter["packets"]
    return total


def probe_events(timeout: float = 1.0, wanted: Wanted | None = None) -> bool | None:
    """Does conntrack announce a new flow here? Sends one UDP datagram over loopback (to a
    socket of our own, so no ICMP) and waits up to ``timeout`` s for its CT_NEW event.

    True: events reach a listener (the kernel tracks this namespace's flows). False: no event
    came (nothing makes the kernel track, or events are off). None: cannot tell (no netlink,
    no privilege). ``wanted(proto, port)``: the probe avoids a destination port a rule uses.
    """
    af_netlink = getattr(socket, "AF_NETLINK", None)
    if af_netlink is None:
        return None
    try:
        nl = socket.socket(af_netlink, socket.SOCK_RAW, NETLINK_NETFILTER)
    except OSError:
        return None
    rx = tx = None
    try:
        try:
            nl.bind((0, NF_NETLINK_CONNTRACK_NEW))
        except OSError:
            return None
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(8):
            rx.bind(("127.0.0.1", 0))
            if wanted is None or not wanted(Proto.UDP, rx.getsockname()[1]):
                break
            rx.close()
            rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        dport = rx.getsockname()[1]
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx.bind(("127.0.0.1", 0))
        sport = tx.getsockname()[1]
        try:
            tx.sendto(b"igdtrigger conntrack probe", ("127.0.0.1", dport))
        except OSError:  # loopback down (ENETUNREACH in a bare network namespace): no probe
            return None
        parser = ConntrackParser()
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            nl.settimeout(left)
            try:
                data = nl.recv(65536)
            except TimeoutError:
                break
            except OSError:
                continue  # ENOBUFS: events were lost; keep waiting for ours
            for flow in parser.feed(data):
                if flow.proto is Proto.UDP and flow.sport == sport and flow.dport == dport:
                    return True
        return False
    finally:
        for s in (nl, rx, tx):
            if s is not None:
                s.close()
