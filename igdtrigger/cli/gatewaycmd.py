"""``igdtrigger gateway``: what the router speaks and how it behaves, probed in parallel.

Read-only by default: nothing is mapped. ``--test`` maps one random high port to this host for
a minute (with a lease, then deleted) to learn how the router treats leases. ``--list`` shows
the router's whole table, igdtrigger's entries marked with whose they are; ``--clean`` removes
igdtrigger's leftovers that nothing running holds (never another program's mapping), what users
did by hand with ``upnpc -l`` / ``upnpc -d``. IPv6 pinholes cannot be listed (the router's
WANIPv6FirewallControl has no action that enumerates them), so ``--list`` shows those the
journals on this machine hold (the service's and every ``igdtrigger run``'s), and ``--clean``
closes the ones nothing running holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import urllib.parse
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# `igdtrigger gateway` is the only command that loads this module (cli/main imports it in
# cmd_gateway): everything it needs is imported here, none of it is on the `run` path.
from igdtrigger.cli.client import Client, read_token
from igdtrigger.config import Config, default_state_dir
from igdtrigger.core.errors import GatewayError, IgdTriggerError, MappingConflict, NoSuchMapping
from igdtrigger.core.model import MappingSpec, PinholeSpec, Proto, RouterMapping
from igdtrigger.core.traits import NO_READBACK
from igdtrigger.gateway.base import Gateway, GatewayInfo
from igdtrigger.netutil import default_gateway
from igdtrigger.runtime import compose
from igdtrigger.runtime.journal import FILENAME, Journal
from igdtrigger.runtime.leftovers import RUN_DIR, RUN_TAG, dead_run_tag, run_alive
from igdtrigger.runtime.pinholes import PinholeClient, PinholeKeeper
from igdtrigger.runtime.state import derived_tag

__all__ = [
    "PinholeEntry",
    "ProbeResult",
    "TableEntry",
    "candidates",
    "classify",
    "close_pinholes",
    "ipv6_verdict",
    "journaled_pinholes",
    "live_service_tag",
    "main",
    "pinhole_report",
    "probe_all",
    "report",
    "router_table",
    "state_tag",
    "table_main",
    "table_report",
]


@dataclass
class ProbeResult:
    """What probing one protocol found: ``ok``, the time it took in seconds, the router's
    ``info`` or the ``error``."""
    protocol: str
    ok: bool
    seconds: float
    info: GatewayInfo | None = None
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON shape of ``gateway --json`` (durations in ms)."""
        out: dict[str, Any] = {"protocol": self.protocol, "ok": self.ok,
                               "ms": round(self.seconds * 1e3, 1)}
        if self.info is not None:
            i = self.info
            out.update(location=i.location, local_address=i.local_address,
                       external_address=i.external_address or None,
                       external_reachable=i.reachable_or_unknown,
                       service_type=i.service_type or None, server=i.server or None,
                       control_url=i.control_url or None, backend=i.backend or None)
        if self.error:
            out["error"] = self.error
        out.update(self.extra)
        return out


def candidates(config: Config) -> list[tuple[str, Gateway]]:
    """The backends to probe: UPnP IGD always, NAT-PMP and PCP when the router's address is
    known (``gateway.url``'s host, else the default gateway)."""
    url = None if config.gateway.simulate else config.gateway.url
    out: list[tuple[str, Gateway]] = [
        ("upnp-igd", compose.gateway_from_config(config, protocol="upnp"))]
    router_ip = (urllib.parse.urlsplit(url).hostname if url else None) or default_gateway()
    if router_ip:
        out.extend(compose.nat_pmp_candidates(router_ip))
    return out


async def _probe(name: str, gw: Gateway, timeout: float, test: bool) -> ProbeResult:
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            info = await gw.connect()
    except TimeoutError:
        return ProbeResult(name, False, time.perf_counter() - t0,
                           error=f"no answer within {timeout:g}s")
    except GatewayError as exc:
        return ProbeResult(name, False, time.perf_counter() - t0, error=str(exc))
    res = ProbeResult(name, True, time.perf_counter() - t0, info)
    if test:
        found = await _lease_test(gw, info)
        res.extra["lease_test"] = found.pop("verdict")
        res.extra.update(found)
    return res


async def _lease_test(gw: Gateway, info: GatewayInfo) -> dict[str, Any]:
    """Map one random high port for 60 s, read it back, delete it, check it is gone.

    Says what the router did, not what it answered: the lease it shows (a router may set its
    own, miniupnp/miniupnp#398), whether it shows the mapping at all, whether the delete took.
    NAT-PMP/PCP cannot look mappings up: their granted reply is all there is."""
    port = random.randint(49152, 65000)  # noqa: S311 - not security
    spec = MappingSpec(Proto.UDP, port, info.local_address, port, "igdtrigger gateway-test")
    reads_back = info.protocol not in NO_READBACK
    out: dict[str, Any] = {"lease_asked": 60}
    try:
        granted = await gw.add(spec, 60)  # a refused timed lease comes back as lease 0
        refused = granted.timed_lease_refused
        if refused is not None:
            out["lease_asked"] = 0
            verdict = (f"only permanent leases ({refused.code} {refused.description}; lease 0 "
                       "accepted): igdtrigger deletes them itself")
        else:
            verdict = "timed leases accepted"
        lease: int | None = granted.lease
        found = await gw.get(Proto.UDP, port) if reads_back else None
        if reads_back and found is None:
            verdict += ("; but the router does not show the mapping right after: it drops "
                        "timed leases or cannot report its mappings (igdtrigger learns which)")
            lease = None
        elif found is not None and found.lease_remaining is not None:
            lease = found.lease_remaining
        out["lease_granted"] = lease
        if lease is not None and out["lease_asked"]:
            if lease == 0:
                verdict += " but made permanent by the router (asked 60s)"
            elif abs(lease - 60) > 5:
                verdict += f" (asked 60s, the router set {lease}s)"
            else:
                verdict += f" (asked 60s, granted {lease}s)"
        if found is not None and found.description != spec.description:
            verdict += f"; it shows the description cut to {found.description!r}"
        if found is not None:
            verdict += await _refresh_test(gw, spec, out["lease_asked"])
        verdict += await _delete_test(gw, spec, out, confirm=reads_back and found is not None)
        out["verdict"] = verdict
    except GatewayError as exc:
        out["verdict"] = f"test mapping refused: {exc}"
    return out


async def _refresh_test(gw: Gateway, spec: MappingSpec, lease: int) -> str:
    """Add the test mapping once more, as a renewal does; what the router made of it."""
    try:
        await gw.add(spec, lease)
    except MappingConflict as exc:
        return (f"; a renewal (the same add again) is refused ({exc.code} {exc.description}): "
                "igdtrigger renews by deleting and re-adding")
    except GatewayError as exc:
        return f"; a renewal (the same add again) failed: {exc}"
    return ""


async def _delete_test(gw: Gateway, spec: MappingSpec, out: dict[str, Any], *,
                       confirm: bool) -> str:
    """Delete the test mapping; where the router can show it, until it is gone (a few tries:
    the test must not leave a port open). ``out["delete_confirmed"]``: gone at the end."""
    tries = 3 if confirm else 1
    for attempt in range(1, tries + 1):
        with contextlib.suppress(NoSuchMapping):  # gone already: it drops timed leases
            await gw.delete(spec.proto, spec.external_port)
        if not confirm:
            return ""
        still = await gw.get(spec.proto, spec.external_port)
        out["delete_confirmed"] = still is None
        if still is None:
            if attempt == 1:
                return ""
            return (f"; the delete was answered but the mapping was still there, gone after "
                    f"delete {attempt} (igdtrigger repeats deletes until the router shows them "
                    "gone)")
    return ("; the delete was answered but the mapping is still there after "
            f"{tries} deletes: it stays open until its lease ends "
            f"({still.lease_remaining if still else '?'}s)")


async def ipv6_verdict(location: str, timeout: float) -> str:
    """What the router's IPv6 firewall service (WANIPv6FirewallControl) says, for pinholes."""
    client = compose.firewall_client(lambda: location, timeout=timeout)
    try:
        async with asyncio.timeout(timeout):
            fw = await client.connect()
    except TimeoutError:
        return f"pinholes unknown: the router's IPv6 side did not answer within {timeout:g}s"
    except GatewayError as exc:
        return f"no pinholes: {exc}"
    ours = compose.ipv6_addresses(client)
    if not fw.enabled:
        return "IPv6 firewall off on the router: IPv6 ports are open without pinholes"
    if not fw.inbound_allowed:
        return "pinholes not allowed (InboundPinholeAllowed=0): allow them on the router"
    return (f"pinholes allowed at {fw.control_url}; opened for "
            + (", ".join(ours) if ours else "no global IPv6 address of this machine"))


async def probe_all(config: Config, *, timeout: float, test: bool) -> list[ProbeResult]:
    """Probe every candidate in parallel, each within ``timeout`` seconds; with ``test``, also
    the lease test (map a port for 60 s, read it back, delete it) on those that answer."""
    if config.gateway.simulate:  # the built-in router on loopback, as `serve --simulate` uses
        async with compose.simulated_router() as sim:
            return await _probe_all(
                replace(config, gateway=replace(config.gateway, url=sim.url)),
                timeout=timeout, test=test, only_upnp=True)
    return await _probe_all(config, timeout=timeout, test=test)


async def _probe_all(config: Config, *, timeout: float, test: bool,
                     only_upnp: bool = False) -> list[ProbeResult]:
    cands = candidates(config)[:1] if only_upnp else candidates(config)
    try:
        results = list(await asyncio.gather(*(_probe(n, g, timeout, test) for n, g in cands)))
    finally:
        for _, g in cands:
            await g.close()
    upnp = results[0]
    if config.gateway.ipv6_pinholes and upnp.ok and upnp.info is not None:
        upnp.extra["ipv6"] = await ipv6_verdict(upnp.info.location, timeout)
    return results


def report(results: list[ProbeResult]) -> str:
    """The human-readable table of ``results``, one line per protocol."""
    lines = []
    for r in results:
        if not r.ok:
            lines.append(f"{r.protocol:9} no     ({r.error})")
            continue
        assert r.info is not None
        i = r.info
        lines.append(f"{r.protocol:9} yes    {r.seconds * 1e3:6.1f} ms  at {i.location}  "
                     f"we are {i.local_address}  external {i.external_address or 'unknown'}"
                     + (f"  [{i.service_type}]" if i.service_type else "")
                     + (f"  via {i.backend}" if i.backend else "")
                     + (f"  server {i.server!r}" if i.server else ""))
        if i.control_url:
            lines.append(f"{'':9} using  {i.control_url}")
        if "lease_test" in r.extra:
            lines.append(f"{'':9} lease  {r.extra['lease_test']}")
        if "ipv6" in r.extra:
            lines.append(f"{'':9} ipv6   {r.extra['ipv6']}")
    ok = [r for r in results if r.ok and r.info is not None]
    if not ok:
        lines.append("no port-mapping protocol answered: enable UPnP (or NAT-PMP/PCP) on the "
                     "router, or set [gateway] url")
        return "\n".join(lines)
    infos = [r.info for r in ok if r.info is not None]
    if not any(i.external_reachable for i in infos):
        known = sorted({i.external_address.strip() for i in infos if i.external_known})
        if known:
            lines.append(f"double NAT / CGNAT: the router's external address ({', '.join(known)})"
                         " is not public: ports opened here are not reachable from the internet")
        else:
            lines.append(str(infos[0].external_warning()))
    servers = " ".join(r.info.server.lower() for r in ok if r.info is not None)
    if "miniupnpd" in servers:
        lines.append("secure mode likely (miniupnpd's default): mappings can only point at the "
                     "host that asks; run igdtrigger on each PC that needs ports")
    lines.append(f"igdtrigger would use: {ok[0].protocol}")
    return "\n".join(lines)


def main(config: Config, *, as_json: bool, timeout: float, test: bool) -> int:
    """``igdtrigger gateway``: probe, print (JSON or table); 0 when a protocol answered, else 1."""
    results = asyncio.run(probe_all(config, timeout=timeout, test=test))
    if as_json:
        print(json.dumps([r.to_json() for r in results], indent=2))
    else:
        print(report(results))
    return 0 if any(r.ok for r in results) else 1


# --- the router's whole table (--list) and our lost leftovers (--clean) ---------------------


@dataclass
class TableEntry:
    """One router mapping and whose it is: ``owner`` says it in words; ``leftover``: it carries
    an igdtrigger tag that no running igdtrigger of this machine holds (``--clean`` removes
    it). Another program's mapping is never a leftover."""

    mapping: RouterMapping
    owner: str
    leftover: bool = False
    removed: bool = False
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        """The JSON shape of one row of ``gateway --table --json``."""
        m = self.mapping
        out: dict[str, Any] = {
            "proto": m.proto.value, "external_port": m.external_port,
            "internal_client": m.internal_client, "internal_port": m.internal_port,
            "description": m.description, "lease_remaining": m.lease_remaining,
            "owner": self.owner, "ours": self.owner != "", "leftover": self.leftover}
        if self.removed:
            out["removed"] = True
        if self.error:
            out["error"] = self.error
        return out


def state_tag(config: Config) -> str:
    """The instance tag this machine's service uses with this config's state directory."""
    state = config.state_dir or default_state_dir()
    try:
        tag = (state / "instance").read_text().strip()
    except OSError:
        tag = ""
    return tag or derived_tag(state)


def live_service_tag(config: Config) -> tuple[bool, str | None]:
    """(a service answers on this config's API address, its instance tag if it told us)."""
    client = Client(config.api.url, token=read_token(config.state_dir), timeout=2.0)
    try:
        status = client.status()
    except IgdTriggerError as exc:
        answered = getattr(exc, "status", None) is not None
        return answered, None
    tag = status.get("instance") if isinstance(status, dict) else None
    return True, tag if isinstance(tag, str) else None


def classify(m: RouterMapping, *, local: str, my_tag: str, live: bool,
             live_tag: str | None) -> TableEntry:
    """Whose a router mapping is (see ``TableEntry``)."""
    parts = m.description.strip().split(" ")
    if len(parts) != 3 or parts[0] != "igdtrigger":
        return TableEntry(m, "")
    tag = parts[2]
    here = m.internal_client == local
    if tag.startswith(RUN_TAG) and tag[len(RUN_TAG):].isdecimal():
        pid = tag[len(RUN_TAG):]
        if not here:
            return TableEntry(m, f"igdtrigger run on {m.internal_client} (pid {pid})")
        if dead_run_tag(m.description):
            return TableEntry(m, f"igdtrigger run, pid {pid} (not running)", leftover=True)
        return TableEntry(m, f"igdtrigger run, pid {pid} (running)")
    if live and (live_tag == tag or (live_tag is None)):
        # a running service holds it (or may: it did not tell us its tag)
        return TableEntry(m, f"igdtrigger service {tag} (running)")
    if tag == my_tag:
        return TableEntry(m, f"igdtrigger service {tag} (not running)", leftover=True)
    if here:
        return TableEntry(m, f"igdtrigger {tag} (no such instance here: a lost state "
                             "directory?)", leftover=True)
    return TableEntry(m, f"igdtrigger {tag} on {m.internal_client}")


@dataclass
class PinholeEntry:
    """An IPv6 pinhole a journal on this machine holds (``journal``: its directory)."""

    spec: PinholeSpec
    owner: str
    journal: Path
    leftover: bool = False
    removed: bool = False
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        """The JSON shape of one journaled pinhole of ``gateway --table --json``."""
        out: dict[str, Any] = {"address": self.spec.address, "proto": self.spec.proto.value,
                               "port": self.spec.port, "owner": self.owner,
                               "leftover": self.leftover}
        if self.removed:
            out["removed"] = True
        if self.error:
            out["error"] = self.error
        return out


def journaled_pinholes(state: Path, *, service_live: bool, tag: str) -> list[PinholeEntry]:
    """The pinholes the journals under ``state`` hold: the service's (a leftover unless it
    runs) and each ``igdtrigger run``'s (a leftover once that wrapper is dead). Nothing is
    created where there is no journal."""
    sources: list[tuple[Path, str, bool]] = [
        (state, f"igdtrigger service {tag} ({'running' if service_live else 'not running'})",
         not service_live)]
    with contextlib.suppress(OSError):
        for d in sorted((state / RUN_DIR).iterdir()):
            pid, sep, start = d.name.partition("-")
            if sep and pid.isdecimal() and start.isdecimal():
                alive = run_alive(int(pid), start)
                sources.append((d, f"igdtrigger run, pid {pid} "
                                   f"({'running' if alive else 'not running'})", not alive))
    out: list[PinholeEntry] = []
    for d, owner, leftover in sources:
        if not (d / FILENAME).exists():
            continue
        j = Journal.open(d)
        try:
            out.extend(PinholeEntry(h, owner, d, leftover) for h in sorted(j.pinholes()))
        finally:
            j.close()
    return out


async def close_pinholes(entries: list[PinholeEntry], client: PinholeClient) -> None:
    """Close the leftover ones (the way a start closes a crash's: ``PinholeKeeper``), and
    forget them in their journal; each not closed says why."""
    for d in sorted({e.journal for e in entries if e.leftover}):
        mine = [e for e in entries if e.leftover and e.journal == d]
        j = Journal.open(d)
        try:
            keeper = PinholeKeeper(client, clock=time.monotonic, lease=1, journal=j)
            keeper.stale = {e.spec for e in mine}
            await keeper.remove_all()
        finally:
            j.close()
        for e in mine:
            e.removed = e.spec not in keeper.stale
            if not e.removed:
                e.error = (keeper.reason or "the router's IPv6 side did not close it; its "
                           "lease ends it")


async def router_table(config: Config, *, clean: bool, dry_run: bool, timeout: float,
                       ) -> tuple[GatewayInfo, list[TableEntry], list[PinholeEntry]]:
    """List the router's table, classify each entry, and with ``clean`` delete the leftovers
    (``dry_run``: only say which); the same for the IPv6 pinholes this machine's journals
    hold. Raises ``GatewayError`` when the router does not answer."""
    gw_cfg = config.gateway
    if gw_cfg.simulate:
        raise GatewayError('gateway.url = "simulate": there is no router table to list')
    live, live_tag = await asyncio.to_thread(live_service_tag, config)
    my_tag = state_tag(config)
    gw = compose.gateway_from_config(config)
    try:
        async with asyncio.timeout(timeout + gw_cfg.discover_timeout):  # discovery, then ask
            info = await gw.connect()
        if info.protocol != "upnp-igd":
            raise GatewayError(
                f"the router answers {info.protocol} only, which cannot list its mapping table "
                "(each client sees only its own); igdtrigger removes its own leftovers from its "
                "journal at the next start")
        found = await gw.list()
        entries = [classify(m, local=info.local_address, my_tag=my_tag, live=live,
                            live_tag=live_tag)
                   for m in sorted(found, key=lambda m: (m.external_port, m.proto.value))]
        if clean and not dry_run:
            for e in entries:
                if not e.leftover:
                    continue
                try:
                    await gw.delete(e.mapping.proto, e.mapping.external_port)
                    e.removed = True
                except NoSuchMapping:
                    e.removed = True  # gone meanwhile
                except GatewayError as exc:
                    e.error = str(exc)
        holes = journaled_pinholes(config.state_dir or default_state_dir(), service_live=live,
                                   tag=my_tag)
        if clean and not dry_run and any(h.leftover for h in holes):
            location = info.location
            await close_pinholes(holes, compose.firewall_client(lambda: location))
    except TimeoutError:
        raise GatewayError("the router did not answer within "
                           f"{timeout + gw_cfg.discover_timeout:g}s") from None
    finally:
        await gw.close()
    return info, entries, holes


def table_report(info: GatewayInfo, entries: list[TableEntry], *, clean: bool,
                 dry_run: bool) -> str:
    """The router's table as text, each row with its owner; then how many are leftovers and
    what ``--clean`` did (or, with ``dry_run``, would do)."""
    lines = [f"router {info.location} ({info.protocol}); we are {info.local_address}; "
             f"{len(entries)} mapping(s)"]
    if entries:
        lines.append(f"{'':2}{'proto':5} {'ext':>5}  {'to':21} {'lease':>7}  "
                     f"{'description':34} owner")
    for e in entries:
        m = e.mapping
        lease = ("?" if m.lease_remaining is None else
                 "perm" if m.lease_remaining == 0 else f"{m.lease_remaining}s")
        mark = "x " if e.removed else "* " if e.owner else "  "
        note = (" -> removed" if e.removed else f" -> not removed: {e.error}" if e.error
                else " -> leftover" if e.leftover else "")
        lines.append(f"{mark}{m.proto.value:5} {m.external_port:>5}  "
                     f"{m.internal_client + ':' + str(m.internal_port):21} {lease:>7}  "
                     f"{m.description[:34]:34} {e.owner or 'another program'}{note}")
    leftovers = [e for e in entries if e.leftover]
    foreign = sum(1 for e in entries if not e.owner)
    if clean and dry_run:
        lines.append(f"would remove {len(leftovers)} leftover mapping(s) of igdtrigger; "
                     f"{foreign} of other programs are never touched")
    elif clean:
        removed = sum(1 for e in entries if e.removed)
        lines.append(f"removed {removed} leftover mapping(s) of igdtrigger"
                     + (f", {len(leftovers) - removed} could not be" if removed < len(leftovers)
                        else "")
                     + f"; {foreign} of other programs left untouched")
    elif leftovers:
        lines.append(f"{len(leftovers)} leftover mapping(s) of igdtrigger that nothing running "
                     "holds: igdtrigger gateway --clean removes them")
    return "\n".join(lines)


def table_main(config: Config, *, as_json: bool, clean: bool, dry_run: bool,
               timeout: float) -> int:
    """``igdtrigger gateway --list`` / ``--clean [--dry-run]``. Exit 0, or 1 when the router
    does not answer or a leftover could not be removed."""
    info, entries, holes = asyncio.run(router_table(config, clean=clean, dry_run=dry_run,
                                                    timeout=timeout))
    if as_json:
        print(json.dumps({"location": info.location, "protocol": info.protocol,
                          "local_address": info.local_address,
                          "mappings": [e.to_json() for e in entries],
                          "pinholes": [h.to_json() for h in holes]}, indent=2))
    else:
        print(table_report(info, entries, clean=clean, dry_run=dry_run))
        if holes:
            print(pinhole_report(holes, clean=clean, dry_run=dry_run))
    return 1 if any(e.error for e in entries) or any(h.error for h in holes) else 0


def pinhole_report(holes: list[PinholeEntry], *, clean: bool, dry_run: bool) -> str:
    """The journaled pinholes as text, each with its owner and what ``--clean`` did."""
    lines = [f"{len(holes)} IPv6 pinhole(s) journaled on this machine (the router cannot list "
             "its pinholes):"]
    for h in holes:
        note = (" -> closed" if h.removed else f" -> not closed: {h.error}" if h.error
                else " -> leftover" if h.leftover else "")
        lines.append(f"{'x ' if h.removed else '* '}{h.spec.proto.value:5} {h.spec.port:>5}  "
                     f"[{h.spec.address}]  {h.owner}{note}")
    left = sum(1 for h in holes if h.leftover)
    if clean and dry_run:
        lines.append(f"would close {left} leftover pinhole(s)")
    elif clean:
        lines.append(f"closed {sum(1 for h in holes if h.removed)} leftover pinhole(s)")
    elif left:
        lines.append(f"{left} leftover pinhole(s): igdtrigger gateway --clean closes them")
    return "\n".join(lines)
