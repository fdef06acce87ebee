"""Topology 1 (igdtrigger is the home gateway): the inner DNAT of each front mapping.

The upstream router maps ``external port -> igdtrigger's own upstream address`` (so a router in
secure mode accepts it); this module forwards what arrives there on to the client: one rule per
mapping in igdtrigger's own table ``ip igdtrigger_front``::

    chain prerouting { type nat hook prerouting priority dstnat; policy accept;
        iifname "eth0" fib daddr type local udp dport 40000 dnat to 10.8.0.10:40000 }

A second chain, ``used`` (hook forward, policy accept, counters only), counts the packets
forwarded to and from each mapping's internal port: the front's "in use" in this topology, for
traffic in either direction (:meth:`InnerDnat.packets`, :meth:`DnatForwarder.used`).

Only packets that came in on the upstream interface (``wan_interface``) addressed to this host
are rewritten; the chain has policy accept and no other verdict, so everything else meets the
router's own tables unchanged. The user's tables are never written, with one opt-in exception:
a drop in any forward chain is final, so when the router's firewall does not already accept
DNATed traffic (``ct status dnat accept``, as OpenWrt's fw4 and firewalld do), ``[front]
forward_chain = "inet filter forward"`` names a chain where an accept rule per mapping is added
(``iifname "eth0" ip daddr 10.8.0.10 udp dport 40000 ct status dnat accept``, marked with the
comment ``igdtrigger-front``) and removed with it. :func:`forward_check` (for ``doctor``) finds
forward chains whose policy would drop the forwarded packets, and names them.

Start (and any repair) rewrites the table and our accept rules in ONE ``nft -f`` transaction
with the whole wanted set (:meth:`InnerDnat.apply`): a table left by a crashed run is swept and
the journal's mappings recreated by the first ``apply`` after start; ``clear()`` at stop leaves
nothing. One mapping's change is one small nf_tables netlink batch (:mod:`igdtrigger.nftnl`:
add its three rules, NEWRULE echoing each handle, or delete them by handle), atomic as a batch
and well under a millisecond, where an ``nft`` process costs several; the netlink rules are the
ones ``nft`` would write (same expressions, so ``nft list`` shows them alike). The counters read
every second are a netlink rule dump too (no ``nft`` process a second on a small router). The
``nft`` path stays for what netlink does not do here (an accept rule in a ``forward_chain`` of a
family other than ip or inet) and as the fallback when netlink fails (the reason is logged once).
The ``nft`` calls block (a subprocess each): run them in a thread from async code. An added
rule's netlink batch returns in ~0.2 ms, so the event loop makes it; a deletion waits for the
kernel's commit (10-20 ms: the old rules' RCU grace period), so it goes to a thread too.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from igdtrigger import nftnl
from igdtrigger.core.errors import ConfigError, NetlinkError
from igdtrigger.core.model import Proto
from igdtrigger.front.contract import FrontMapping
from igdtrigger.front.dnatrules import (
    DnatRule,
    accept_exprs,
    counted,
    dnat_exprs,
    items,
    rule_of,
    use_exprs,
)
from igdtrigger.netutil import source_address_for
from igdtrigger.nftcmd import NftResult, Runner, find_nft, nft_why, run_nft

__all__ = [
    "COMMENT",
    "TABLE",
    "DnatForwarder",
    "DnatRule",
    "ForwardDrop",
    "InnerDnat",
    "forward_check",
    "interface_of",
    "parse_chain",
    "read_forward_drops",
]

log = logging.getLogger("igdtrigger.front")

TABLE = "ip igdtrigger_front"
"""The nftables table holding the inner DNAT rules (``family name``); ours alone."""
_PREROUTING, _USED = f"{TABLE} prerouting", f"{TABLE} used"
_ECHO = re.compile(r"^add rule (\S+ \S+ \S+) .* # handle (\d+)$", re.MULTILINE)
ADDRESS_TTL = 2.0  # s an upstream address lookup is reused (a DHCP change is seen within it)
ACCEPT_CHECK_EVERY = 10  # used() calls (seconds under serve) between accept-rule checks
COMMENT = "igdtrigger-front"
"""The comment marking our accept rules in the user's ``forward_chain``."""


def parse_chain(text: str) -> tuple[str, str, str]:
    """``"inet filter forward"`` -> ``("inet", "filter", "forward")``. Raises ``ConfigError``."""
    parts = text.split()
    families = ("ip", "ip6", "inet", "bridge", "netdev", "arp")
    if len(parts) != 3 or parts[0] not in families or not all(
            p.replace("_", "").replace("-", "").isalnum() for p in parts[1:]):
        raise ConfigError(f"[front] forward_chain {text!r}: expected '<family> <table> <chain>' "
                          f"(family one of {', '.join(families)}), e.g. 'inet filter forward'")
    return parts[0], parts[1], parts[2]


def _quote(name: str) -> str:
    return '"' + name.replace('"', "") + '"'


class InnerDnat:
    """The inner DNAT table and our forward accept rules (see the module docstring).

    ``wan_interface``: the upstream-facing interface; ``forward_chain``: ``"family table
    chain"`` for accept rules, or ``None``. ``rules``: what is loaded now. ``opener``: the
    nf_tables netlink socket (``None``: never use netlink, only ``nft``). Raises
    ``ConfigError`` for a bad chain or interface name; :meth:`apply` raises ``OSError`` with
    nft's reason when the transaction fails (nothing changed then: nft is atomic)."""

    def __init__(self, wan_interface: str, *, forward_chain: str | None = None,
                 nft: str | None = None, runner: Runner | None = None,
                 opener: nftnl.Opener | None = nftnl.open_socket) -> None:
        if not wan_interface or len(wan_interface) > 15 or '"' in wan_interface:
            raise ConfigError(f"[front] upstream interface {wan_interface!r} is not a valid name")
        self.wan_interface = wan_interface
        self.forward_chain = parse_chain(forward_chain) if forward_chain else None
        self.nft = nft if nft is not None else find_nft()
        self.runner: Runner = runner or run_nft
        self.opener = opener
        self.rules: frozenset[DnatRule] = frozenset()
        self._handles: dict[DnatRule, list[tuple[str, int]]] = {}  # (family table chain, handle)
        self.installed = False
        self.netlink_changes = 0  # changes made over netlink (status, tests)
        self.netlink_failed = ""  # why netlink last failed ("" never): nft was used instead

    # -- scripts --------------------------------------------------------------------------------
    def _dnat_line(self, rule: DnatRule) -> str:
        p = rule.proto.value.lower()
        return (f"        iifname {_quote(self.wan_interface)} fib daddr type local {p} dport "
                f"{rule.external_port} dnat to {rule.client}:{rule.internal_port}")

    @staticmethod
    def _use_lines(rule: DnatRule) -> list[str]:
        """The ``used`` chain's two counting rules: packets forwarded to the client's internal
        port through the mapping, and from that port out (either direction is use)."""
        p = rule.proto.value.lower()
        return [f"        ct status dnat ip daddr {rule.client} {p} dport {rule.internal_port} "
                "counter",
                f"        ip saddr {rule.client} {p} sport {rule.internal_port} counter"]

    def _accept_rule(self, rule: DnatRule) -> str:
        assert self.forward_chain is not None
        p = rule.proto.value.lower()
        return (f"add rule {' '.join(self.forward_chain)} iifname {_quote(self.wan_interface)} "
                f"ip daddr {rule.client} {p} dport {rule.internal_port} ct status dnat accept "
                f"comment {_quote(COMMENT)}")

    def script(self, rules: Iterable[DnatRule], *, stale_handles: Sequence[int] = ()) -> str:
        """The ``nft -f`` transaction that makes the table (and accept rules) exactly ``rules``:
        the table is re-created whole, our old accept rules (``stale_handles``) deleted."""
        wanted = sorted(set(rules))
        lines = [f"table {TABLE} {{}}", f"delete table {TABLE}", f"table {TABLE} {{",
                 "    chain prerouting {",
                 "        type nat hook prerouting priority dstnat; policy accept;"]
        lines += [self._dnat_line(r) for r in wanted]
        lines += ["    }", "    chain used {",
                  "        type filter hook forward priority filter; policy accept;"]
        lines += [line for r in wanted for line in self._use_lines(r)]
        lines += ["    }", "}"]
        if self.forward_chain is not None:
            chain = " ".join(self.forward_chain)
            lines += [f"delete rule {chain} handle {h}" for h in stale_handles]
            lines += [self._accept_rule(r) for r in wanted]
        return "\n".join(lines) + "\n"

    # -- operations -----------------------------------------------------------------------------
    def _run(self, args: Sequence[str], script: str = "") -> NftResult:
        if self.nft is None:
            raise OSError("the nft command is missing: install nftables (the front's inner DNAT "
                          "needs it when igdtrigger is the home gateway)")
        return self.runner([self.nft, *args], script)

    def our_accept_handles(self) -> list[int]:
        """Handles of the rules marked ``igdtrigger-front`` in ``forward_chain`` (ours)."""
        if self.forward_chain is None:
            return []
        result = self._run(["-j", "-a", "list", "chain", *self.forward_chain])
        if result.returncode != 0:
            raise OSError(f"cannot read forward chain {' '.join(self.forward_chain)}: "
                          f"{nft_why(result)}")
        return [int(r["handle"]) for r in items(result.stdout, "rule")
                if r.get("comment") == COMMENT and isinstance(r.get("handle"), int)]

    def apply(self, rules: Iterable[DnatRule]) -> None:
        """Make the loaded rules exactly ``rules`` (one atomic transaction)."""
        wanted = frozenset(rules)
        result = self._run(["-e", "-a", "-f", "-"],
                           self.script(wanted, stale_handles=self.our_accept_handles()))
        if result.returncode != 0:
            raise OSError(f"inner DNAT not loaded: {nft_why(result)}")
        self.rules = wanted
        self.installed = True
        self._handles = self._assign(sorted(wanted), result.stdout)

    def _assign(self, order: list[DnatRule], echo: str) -> dict[DnatRule, list[tuple[str, int]]]:
        """Each rule's (chain, handle) pairs, from nft's echo (``-e -a``) of a script that
        added ``order``'s rules chain by chain, in that order: one DNAT rule, two counting rules
        and (with a forward chain) one accept rule each."""
        added = [(m.group(1), int(m.group(2))) for m in _ECHO.finditer(echo)]
        per = [(_PREROUTING, 1), (_USED, 2)]
        if self.forward_chain is not None:
            per.append((" ".join(self.forward_chain), 1))
        out: dict[DnatRule, list[tuple[str, int]]] = {r: [] for r in order}
        for chain, count in per:
            handles = [h for c, h in added if c == chain]
            if len(handles) != count * len(order):
                return {}
            for i, r in enumerate(order):
                out[r] += [(chain, h) for h in handles[i * count:(i + 1) * count]]
        return out

    def _netlink(self, ops: list[nftnl.Op]) -> list[int] | None:
        """Run ``ops`` as one netlink batch; ``None`` (and the reason logged once) when
        netlink is off or failed: the caller goes the ``nft`` way then."""
        if self.opener is None:
            return None
        try:
            handles = nftnl.batch(ops, opener=self.opener)
        except (NetlinkError, OSError) as exc:
            why = f"{exc.strerror or exc} (errno {exc.errno})"
            if why != self.netlink_failed and exc.errno != errno.ENOENT:
                log.warning("front: inner DNAT change over nf_tables netlink failed: %s; "
                            "using the nft command", why)
            self.netlink_failed = why
            return None
        self.netlink_changes += 1
        return handles

    def add_fast(self, rule: DnatRule) -> bool:
        """Add one rule (its DNAT, counting and, with a ``forward_chain`` of family ip or
        inet, accept rules) in one netlink batch when that can be done alone (the table is in
        place, no other target on the port). False: use
        :meth:`add` (``nft``). Quick enough for the event loop (~0.2 ms); raises ``OSError``
        only from the rewrite when the rules went in but their handles did not come back."""
        if rule in self.rules:
            return True
        if not self.installed or any((r.proto, r.external_port) == (rule.proto,
                                                                   rule.external_port)
                                     for r in self.rules):
            return False
        family, table = TABLE.split()
        bodies = [((family, table, "prerouting"), dnat_exprs(self.wan_interface, rule), ""),
                  *(((family, table, "used"), exprs, "") for exprs in use_exprs(rule))]
        if self.forward_chain is not None:
            accept = accept_exprs(self.wan_interface, rule, self.forward_chain[0])
            if accept is None:
                return False
            bodies.append((self.forward_chain, accept, COMMENT))
        handles = self._netlink([nftnl.Op(nftnl.NFT_MSG_NEWRULE, nftnl.FAMILIES[chain[0]],
                                          nftnl.rule_body(chain[1], chain[2], exprs,
                                                          comment=comment),
                                          nftnl.NLM_F_CREATE | nftnl.NLM_F_APPEND, echo=True)
                                 for chain, exprs, comment in bodies])
        if handles is None or not all(handles):
            if handles is not None:  # added, but the handles did not come back: rewrite
                self.apply(self.rules | {rule})
                return True
            return False
        self.rules = self.rules | {rule}
        self._handles[rule] = [(" ".join(chain), h) for (chain, _, _), h in zip(bodies, handles,
                                                                                strict=True)]
        return True

    def remove_fast(self, rule: DnatRule) -> bool:
        """Delete one rule's rules by handle in one netlink batch (accept rule included).
        False: use :meth:`remove` (``nft``). Blocks for the kernel's commit (10-20 ms)."""
        if rule not in self.rules:
            return True
        pairs = self._handles.get(rule)
        if not pairs or not self.installed:
            return False
        ops = []
        for chain, handle in pairs:
            family, table, name = chain.split()
            ops.append(nftnl.Op(nftnl.NFT_MSG_DELRULE, nftnl.FAMILIES[family],
                                nftnl.rule_handle(table, name, handle)))
        if self._netlink(ops) is None:
            return False
        self.rules = self.rules - {rule}
        del self._handles[rule]
        return True

    def add(self, rule: DnatRule) -> None:
        """Add one rule with ``nft``: one small transaction (a few ms) when the table is in
        place, else (or when that fails, or the external port changes target) the whole table
        again."""
        if rule in self.rules:
            return
        clash = any((r.proto, r.external_port) == (rule.proto, rule.external_port)
                    for r in self.rules)
        if self.installed and not clash:
            script = f"add rule {TABLE} prerouting {self._dnat_line(rule).strip()}\n"
            script += "".join(f"add rule {TABLE} used {line.strip()}\n"
                              for line in self._use_lines(rule))
            if self.forward_chain is not None:
                script += self._accept_rule(rule) + "\n"
            result = self._run(["-e", "-a", "-f", "-"], script)
            handles = self._assign([rule], result.stdout) if result.returncode == 0 else {}
            if handles:
                self.rules = self.rules | {rule}
                self._handles.update(handles)
                return
        self.apply(self.rules | {rule})

    def remove(self, rule: DnatRule) -> None:
        """Delete one rule by its handles (whole table again when they are unknown or stale)."""
        if rule not in self.rules:
            return
        pairs = self._handles.get(rule)
        if pairs and self.installed:
            result = self._run(["-f", "-"], "".join(f"delete rule {chain} handle {h}\n"
                                                    for chain, h in pairs))
            if result.returncode == 0:
                self.rules = self.rules - {rule}
                del self._handles[rule]
                return
        self.apply(self.rules - {rule})

    def clear(self) -> None:
        """Delete the table and our accept rules (at stop; also what a sweep does when no
        mapping is to be kept)."""
        script = f"table {TABLE} {{}}\ndelete table {TABLE}\n"
        if self.forward_chain is not None:
            chain = " ".join(self.forward_chain)
            script += "".join(f"delete rule {chain} handle {h}\n"
                              for h in self.our_accept_handles())
        result = self._run(["-f", "-"], script)
        if result.returncode != 0:
            raise OSError(f"inner DNAT not removed: {nft_why(result)}")
        self.rules = frozenset()
        self._handles = {}
        self.installed = False

    def packets(self) -> dict[tuple[Proto, str, int], int] | None:
        """Packets the ``used`` chain counted per (protocol, client, internal port), both
        directions together: what :class:`DnatForwarder` turns into "in use". ``None`` when
        the chain is not there (someone removed our table: ``nft flush ruleset``). Read over
        netlink (a rule dump, matched to our rules by the handles we hold) when every rule's
        handles are known, else from an ``nft -j`` listing."""
        out: dict[tuple[Proto, str, int], int] = {}
        owner = {h: r for r, pairs in self._handles.items() for c, h in pairs if c == _USED}
        if self.opener is not None and len(owner) == 2 * len(self.rules):
            try:
                counts = nftnl.rule_counters(nftnl.NFPROTO_IPV4, TABLE.split()[1], "used",
                                             opener=self.opener)
                # a dump names no missing table: our rules' absence (or the table's) says it
                gone = not owner.keys() <= counts.keys() if owner else not nftnl.table_exists(
                    nftnl.NFPROTO_IPV4, TABLE.split()[1], opener=self.opener)
                if gone:
                    return None
            except (NetlinkError, OSError):
                pass  # the nft listing below
            else:
                for handle, packets in counts.items():
                    if (mine := owner.get(handle)) is not None:
                        at = (mine.proto, mine.client, mine.internal_port)
                        out[at] = out.get(at, 0) + packets
                return out
        result = self._run(["-j", "list", "chain", *TABLE.split(), "used"])
        if result.returncode != 0:
            return None
        for rule in items(result.stdout, "rule"):
            key, count = counted(rule)
            if key is not None:
                out[key] = out.get(key, 0) + count
        return out

    def loaded(self) -> list[DnatRule]:
        """The rules in the kernel now, read back from ``nft -j list table`` (empty when the
        table is missing): what a caller checks after ``apply``, and what a sweep finds."""
        result = self._run(["-j", "list", "table", *TABLE.split()])
        if result.returncode != 0:
            return []
        return sorted(r for r in map(rule_of, items(result.stdout, "rule")) if r is not None)


@dataclass(frozen=True, slots=True)
class ForwardDrop:
    """A forward chain that would drop the front's DNATed packets: ``chain`` ("inet filter
    forward") and ``text``, the sentence ``doctor`` prints."""

    chain: str
    text: str


def _accepts_dnat(rules: list[dict[str, Any]]) -> bool:
    """Does one of these rules accept every DNATed flow: ``ct status dnat accept``, with no
    match other than on conntrack (our own per-mapping rules do not count)?"""
    for rule in rules:
        if rule.get("comment") == COMMENT:
            continue
        exprs = [e for e in rule.get("expr", []) if isinstance(e, dict)]
        matches = [e["match"] for e in exprs if isinstance(e.get("match"), dict)]
        on_ct = all(isinstance(m.get("left"), dict) and "ct" in m["left"] for m in matches)
        status = any(m.get("left") == {"ct": {"key": "status"}}
                     and "dnat" in json.dumps(m.get("right")) for m in matches)
        if on_ct and status and any("accept" in e for e in exprs):
            return True
    return False


def forward_check(listing: str, *, forward_chain: str | None = None) -> list[ForwardDrop]:
    """The forward-hook base chains of ``nft -j list ruleset`` output whose policy is drop and
    that neither accept ``ct status dnat`` nor are the configured ``forward_chain`` (where our
    accept rules go). Empty: DNATed traffic passes every forward chain's policy."""
    chains = items(listing, "chain")
    rules = items(listing, "rule")
    configured = parse_chain(forward_chain) if forward_chain else None
    out: list[ForwardDrop] = []
    for chain in chains:
        if chain.get("hook") != "forward" or chain.get("policy") != "drop":
            continue
        key = (str(chain.get("family")), str(chain.get("table")), str(chain.get("name")))
        if key == configured:
            continue
        own = [r for r in rules if (r.get("family"), r.get("table"), r.get("chain")) == key]
        if _accepts_dnat(own):
            continue
        name = " ".join(key)
        out.append(ForwardDrop(name, (
            f"forward chain {name} has policy drop and no 'ct status dnat accept' rule: packets "
            f"the front forwards to LAN clients would be dropped there; add "
            f"'ct status dnat accept' to it, or set [front] forward_chain = \"{name}\" so "
            "igdtrigger adds an accept rule per mapping")))
    return out


def read_forward_drops(*, forward_chain: str | None = None, nft: str | None = None,
                       runner: Runner | None = None) -> list[ForwardDrop] | None:
    """:func:`forward_check` on this host's ruleset (``nft -j list ruleset``); ``None`` when
    it cannot be read (no nft, not allowed)."""
    nft = nft if nft is not None else find_nft()
    if nft is None:
        return None
    result = (runner or run_nft)([nft, "-j", "list", "ruleset"], "")
    if result.returncode != 0:
        return None
    return forward_check(result.stdout, forward_chain=forward_chain)


def interface_of(address: str) -> str | None:
    """The interface holding IPv4 ``address`` (netifaces), or ``None``."""
    import netifaces  # optional C extension, needed only when the front serves named interfaces

    for name in netifaces.interfaces():
        for entry in netifaces.ifaddresses(name).get(netifaces.AF_INET, []):
            if entry.get("addr") == address:
                return str(name)
    return None


def _rules_of(mappings: Iterable[FrontMapping]) -> frozenset[DnatRule]:
    return frozenset(DnatRule(m.request.proto, m.grant.external_port, m.request.internal_client,
                              m.request.internal_port) for m in mappings)


class DnatForwarder:
    """``front.manager.Forwarder`` over :class:`InnerDnat`: the upstream mapping's target is
    our own address on the upstream interface; each client mapping is one DNAT rule (and accept
    rule), changed in a worker thread, one change at a time. :meth:`restore` is the sweep after
    a crash: the table becomes exactly the mappings the front took back from the journal."""

    def __init__(self, dnat: InnerDnat, upstream_host: str) -> None:
        self.dnat = dnat
        self.upstream_host = upstream_host
        self._lock = asyncio.Lock()
        self._counted: dict[tuple[Proto, str, int], int] = {}
        self.reloads = 0  # times the table (or our accept rules) was found missing and put back
        self._address: tuple[float, str | None] = (-math.inf, None)  # (looked up at, address)
        self._ticks = 0

    def upstream_address(self) -> str | None:
        """Our own address on the upstream interface (what the upstream mapping points at);
        ``None`` when the route to the upstream router leaves by another interface. Looked up
        (a route lookup and the interface list: ~0.15 ms) at most every ADDRESS_TTL s."""
        now = time.monotonic()
        if now - self._address[0] >= ADDRESS_TTL:
            own = source_address_for(self.upstream_host)
            ok = own is not None and interface_of(own) == self.dnat.wan_interface
            self._address = (now, own if ok else None)
        return self._address[1]

    async def _apply(self, rules: frozenset[DnatRule]) -> None:
        async with self._lock:
            await asyncio.to_thread(self.dnat.apply, rules)

    async def add(self, proto: Proto, external_port: int, client: str,
                  internal_port: int) -> None:
        """Forward ``proto``/``external_port`` to ``client:internal_port``. Raises
        ``OSError`` when nft refuses."""
        rule = DnatRule(proto, external_port, client, internal_port)
        async with self._lock:
            if not self.dnat.add_fast(rule):
                await asyncio.to_thread(self.dnat.add, rule)

    async def remove(self, proto: Proto, external_port: int) -> None:
        """Stop forwarding ``proto``/``external_port`` (nothing when it is not forwarded)."""
        async with self._lock:
            for rule in [r for r in self.dnat.rules
                         if (r.proto, r.external_port) == (proto, external_port)]:
                await asyncio.to_thread(self._remove, rule)

    def _remove(self, rule: DnatRule) -> None:
        """In a worker thread: a deletion waits for the kernel's RCU grace period (10-20 ms
        measured on Linux 6.18, netlink or nft alike), too long to hold the event loop."""
        if not self.dnat.remove_fast(rule):
            self.dnat.remove(rule)

    async def restore(self, mappings: Iterable[FrontMapping]) -> None:
        """After a crash (or any start): the table becomes exactly the forwarding of these
        mappings (those the front took back from the journal); the rest is swept."""
        await self._apply(_rules_of(mappings))

    async def sync(self, mappings: Iterable[FrontMapping]) -> None:
        """Like :meth:`restore`, but only when the wanted rules differ from the loaded ones."""
        wanted = _rules_of(mappings)
        if wanted != self.dnat.rules:
            await self._apply(wanted)

    async def used(self, mappings: Iterable[FrontMapping]) -> list[FrontMapping]:
        """The mappings whose traffic the kernel counted since the last call (either
        direction, every packet: a single long flow keeps counting). The counters are read
        (an ``nft`` listing, a few ms) without holding up a client's add; only a repair (our
        table or accept rules found gone) takes the lock, after looking again under it."""
        counts = await asyncio.to_thread(self.dnat.packets)
        if counts is None:
            async with self._lock:
                counts = await asyncio.to_thread(self.dnat.packets)
                if counts is None and self.dnat.installed:  # a firewall reload took it
                    log.warning("nftables table %s was removed by someone else (a firewall "
                                "reload?); loading it again with %d rule(s)", TABLE,
                                len(self.dnat.rules))
                    await asyncio.to_thread(self.dnat.apply, self.dnat.rules)
                    self.reloads += 1
            if counts is None:
                self._counted.clear()
                return []
        self._ticks += 1
        if self.dnat.forward_chain is not None and self._ticks % ACCEPT_CHECK_EVERY == 0:
            have = await asyncio.to_thread(self.dnat.our_accept_handles)
            if len(have) != len(self.dnat.rules):
                async with self._lock:
                    have = await asyncio.to_thread(self.dnat.our_accept_handles)
                    if len(have) != len(self.dnat.rules):  # the user's firewall was reloaded
                        log.warning("our accept rules in %s are gone (a firewall reload?); "
                                    "adding them again", " ".join(self.dnat.forward_chain))
                        await asyncio.to_thread(self.dnat.apply, self.dnat.rules)
                        self.reloads += 1
        out = []
        for m in mappings:
            key = (m.request.proto, m.request.internal_client, m.request.internal_port)
            seen = counts.get(key, 0)
            if seen > self._counted.get(key, 0):
                out.append(m)
            self._counted[key] = seen
        return out

    async def close(self) -> None:
        """Delete the table and our accept rules (at stop). Raises ``OSError``."""
        async with self._lock:
            await asyncio.to_thread(self.dnat.clear)
