"""``igdtrigger doctor`` and ``igdtrigger healthcheck``.

doctor prints one line per check, ``ok``/``warn``/``FAIL``, each problem followed by what to do
about it, and exits 1 when a check failed. healthcheck asks the local service's ``/healthz``
(or ``/readyz`` with ``--ready``) and exits 0 or 1: Docker's HEALTHCHECK runs it.
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from igdtrigger.cli.client import Client, local_access, pick_token, resolve_server
from igdtrigger.config import Config, default_state_dir, load_config
from igdtrigger.core.errors import ApiError, ConfigError, IgdTriggerError
from igdtrigger.nftcmd import find_nft

__all__ = [
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "Check",
    "check_api",
    "check_config",
    "check_detectors",
    "check_front",
    "check_gateway",
    "check_privileges",
    "check_state_dir",
    "check_tracking",
    "doctor",
    "effective_capabilities",
    "healthcheck",
]

CAP_NET_ADMIN = 12
CAP_NET_RAW = 13


@dataclass(frozen=True, slots=True)
class Check:
    """One line of ``igdtrigger doctor``: ``level`` (``ok``, ``warn``, ``FAIL``), what was
    checked, what was found, and the fix when there is one."""
    level: str  # "ok", "warn", "FAIL"
    name: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        """``level  name: detail -> fix``, as printed."""
        text = f"{self.level:<4}  {self.name}: {self.detail}"
        return f"{text} -> {self.fix}" if self.fix else text


def effective_capabilities(status_path: str = "/proc/self/status") -> int | None:
    """CapEff of this process (Linux), or None when unknown."""
    try:
        with open(status_path) as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        return None
    return None


def check_config(config: Config) -> Check:
    """What can open ports: the rules, the IGD front (its clients' requests), or nothing."""
    front = ("the IGD front ([front]): LAN apps' UPnP IGD, NAT-PMP and PCP requests"
             if config.front.enabled else "")
    if config.rules:
        return Check("ok", "config", f"{config.source}: {len(config.rules)} rule(s)"
                     + (f", and {front}" if front else ""))
    if front:
        return Check("ok", "config", f"{config.source}: no rules; activations come from {front}")
    return Check("warn", "config", f"{config.source}: no rules, nothing can be opened",
                 "add [[rules]] (see examples/rules/), or enable the IGD front ([front])")


def check_front(config: Config, caps: int | None) -> list[Check]:
    """The IGD front as this host is now (no service needed): the topology ``serve`` would
    detect, what the upstream router must allow, the forward chains that would drop the
    forwarded packets (topology 1), and the privilege the inner DNAT needs."""
    if not config.front.enabled:
        return []
    # the front's modules: only with [front] (healthcheck loads this module too)
    from igdtrigger.front.topology import local_topology, topology_checks

    f = config.front
    topo = local_topology(f.interfaces, config.gateway.url, forward_chain=f.forward_chain)
    out = [Check(*c) for c in topology_checks(topo)]
    if topo["kind"] == "gateway" and find_nft() is None:
        # serve refuses to start then (front/dnat.py InnerDnat._run); the forward chains
        # could not be read for that reason, not for a privilege
        out = [c for c in out if not (c.name == "front forwarding" and c.level == "warn")]
        out.append(Check("FAIL", "front forwarding", "this host routes the LAN (topology "
                         "1), so the front loads its inner DNAT table with the nft "
                         "command, and it is missing: `igdtrigger serve` would not start",
                         "install nftables (Debian/Ubuntu: apt install nftables)"))
    if topo["kind"] == "gateway" and caps is not None and not caps >> CAP_NET_ADMIN & 1:
        out.append(Check("FAIL", "front forwarding", "this host routes the LAN (topology 1), "
                         "so the front adds inner DNAT rules with nftables: that needs "
                         "CAP_NET_ADMIN", "run the service as root or with "
                         "AmbientCapabilities=CAP_NET_ADMIN"))
    return out


def check_privileges(config: Config, caps: int | None) -> Check:
    """Has this process the capabilities conntrack needs (CAP_NET_ADMIN)? ``caps``: the
    effective capability mask, ``None`` where it cannot be read."""
    needs = "conntrack" in config.detect.methods
    if caps is None:
        return Check("ok" if not needs else "warn", "privileges",
                     "cannot read capabilities on this platform",
                     "" if not needs else "conntrack detection needs Linux with CAP_NET_ADMIN")
    has_admin = bool(caps >> CAP_NET_ADMIN & 1)
    if has_admin:
        return Check("ok", "privileges", "CAP_NET_ADMIN present (conntrack events available)")
    if not needs:
        return Check("ok", "privileges", "no capability needed (no conntrack detection)")
    return Check("warn", "privileges", "no CAP_NET_ADMIN: traffic triggers will not be seen",
                 "run the service as root or with AmbientCapabilities=CAP_NET_ADMIN "
                 "(examples/igdtrigger.service); explicit activations work without it")


def check_detectors(config: Config) -> list[Check]:
    """Build the configured detectors and run each one's ``check``: one line per detector."""
    # only `doctor` needs the backends: `healthcheck` (Docker's HEALTHCHECK, every interval)
    # loads this module too and talks to the API alone
    from igdtrigger.runtime.compose import build_detectors

    out: list[Check] = []
    try:
        detectors = build_detectors(config)
    except IgdTriggerError as exc:
        return [Check("warn", "detectors", str(exc))]
    if not detectors:
        return [Check("ok", "detectors", "none configured ([detect] methods = []); "
                      "activations come from run/activate/the API only")]
    usable: set[str] = set()
    for det in detectors:
        standby = getattr(det, "standby_for", "")
        if standby and standby in usable:
            out.append(Check("ok", f"detector {det.name}",
                             f"standby (stands in if {standby} stops)"))
            continue
        try:
            det.check()
        except IgdTriggerError as exc:
            idle = det.name == "process" and not any(r.process for r in config.rules)
            out.append(Check("ok" if idle else "warn", f"detector {det.name}", str(exc),
                             "" if idle else "explicit activations still work"))
        else:
            check = (check_tracking(config, det) if det.name == "conntrack"
                     else Check("ok", f"detector {det.name}", "can run"))
            if check.level == "ok":
                usable.add(det.name)
            out.append(check)
    return out


def check_tracking(config: Config, det: object, tracking: Any = None) -> Check:
    """conntrack can subscribe; will it see trigger flows? Only if the kernel tracks them:
    the service's own nftables table (needs nft), or this machine's own rules (probed)."""
    # the backends: see check_detectors
    from igdtrigger.runtime import compose

    t = tracking or compose.kernel_tracking(config)
    table = compose.tracking_table()
    name = "detector conntrack"
    wanted = getattr(det, "wanted", None)
    front = config.front.enabled  # its clients' flows are use of their mappings
    triggers = any(r.trigger for r in config.rules)
    if not triggers and not front:
        return Check("ok", name, "can run (no rule has a trigger port)")
    what = " and ".join(w for w, on in (("the trigger flows", triggers),
                                        ("the IGD front's clients' flows", front)) if on)
    if t.enabled and t.available:
        how = t.nft or "over netlink: no nft command"
        return Check("ok", name, f"can run; the service loads nftables table {table} so the "
                     f"kernel tracks {what} ({how})")
    why = ("[detect] track_flows = false" if not t.enabled
           else "the nft command is missing")
    if t.probe(1.0, wanted):
        return Check("ok", name, f"can run; conntrack events verified by a loopback probe "
                     f"(this machine's own rules make the kernel track flows; {why})")
    return Check("warn", name, f"can subscribe, but the kernel does not track connections here "
                 f"and {why}: {what} would not be seen; the socket table stands in",
                 "install nftables (the service then loads its own table)" if t.enabled
                 else "set [detect] track_flows = true, or add a `ct` rule of your own")


async def _probe_gateway(config: Config, timeout: float) -> tuple[Any, Any, str]:
    # the backends: see check_detectors
    from igdtrigger.runtime.compose import gateway_from_config

    gw = gateway_from_config(config, protocol="upnp")
    try:
        async with asyncio.timeout(timeout):
            info = await gw.connect()
        return gw, info, ""
    except TimeoutError:
        return gw, None, f"no answer within {timeout:g}s"
    except IgdTriggerError as exc:
        return gw, None, str(exc)
    finally:
        await gw.close()


def check_gateway(config: Config) -> list[Check]:
    """Connect to the router as the service would: who answers, its external address, double
    NAT, and IPv6 pinholes when enabled."""
    if config.gateway.simulate:
        return [Check("ok", "gateway", "simulated router (gateway.url = \"simulate\"); no real "
                      "router is touched")]
    timeout = config.gateway.discover_timeout + 5.0
    gw, info, error = asyncio.run(_probe_gateway(config, timeout))
    out: list[Check] = []
    probes = getattr(gw, "probe_results", None)
    if isinstance(probes, dict) and probes:
        shown = "; ".join(f"{name}: {res}" for name, res in probes.items())
        out.append(Check("ok" if info is not None else "warn", "protocols", shown))
    if info is None:
        where = config.gateway.url or "SSDP discovery"
        out.append(Check("FAIL", "gateway", f"no router answered ({where}): {error}",
                         "enable UPnP IGD on the router, or set [gateway] url to its "
                         "description URL (e.g. http://192.168.1.1:5000/rootDesc.xml)"))
        return out
    out.append(Check("ok", "gateway", f"{info.protocol} at {info.location}; this host is "
                     f"{info.local_address}"))
    if not info.external_address:
        out.append(Check("warn", "external address", "the router does not say",
                         "check the router's WAN connection"))
    elif info.external_reachable:
        out.append(Check("ok", "external address", f"{info.external_address} is public"))
    else:
        told = (f"; the IGD front tells its apps {info.external_address} anyway (it is the "
                "upstream's answer), so they see the double NAT too"
                if config.front.enabled else "")
        out.append(Check("warn", "external address",
                         f"{info.external_address} is not public (double NAT or CGNAT): ports "
                         f"opened here are not reachable from the internet{told}",
                         "put the upstream router in bridge mode, forward the ports there too, "
                         "or ask the ISP for a public address"))
    if config.gateway.ipv6_pinholes and info.protocol == "upnp-igd":
        # gatewaycmd loads the backends: see check_detectors
        from igdtrigger.cli.gatewaycmd import ipv6_verdict

        verdict = asyncio.run(ipv6_verdict(info.location, 3.0))
        good = verdict.startswith(("pinholes allowed", "IPv6 firewall off"))
        no_v6 = "no IPv6 default route" in verdict or "no global IPv6" in verdict
        out.append(Check("ok" if good or no_v6 else "warn", "ipv6", verdict,
                         "" if good or no_v6 else
                         "IPv6 ports stay closed; IPv4 is not affected (set [gateway] "
                         "ipv6_pinholes = false to stop asking)"))
    return out


def check_state_dir(config: Config) -> Check:
    """Is the state directory writable (or creatable)?"""
    state = config.state_dir or default_state_dir()
    if state.is_dir() and os.access(state, os.W_OK):
        return Check("ok", "state directory", f"{state} is writable")
    if not state.exists() and os.access(_existing_parent(state), os.W_OK):
        return Check("ok", "state directory", f"{state} will be created on first start")
    return Check("warn", "state directory", f"{state} is not writable by this user",
                 "run as the service's user, or set [service] state_dir; a crash's leftover "
                 "mappings are only recognised with a writable state directory")


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_api(config: Config, server: str | None, token: str | None) -> list[Check]:
    """Does a service answer, and does it accept our token?"""
    where = resolve_server(server, config, discover_timeout=1.0)
    chosen, guessed = pick_token(token, config.state_dir, where.trusted)
    sock, uid = local_access(where, config.state_dir)
    client = Client(where.url, token=chosen, timeout=3.0, admin_socket=sock, token_uid=uid,
                    token_guessed=guessed)
    try:
        health = client.health()
    except IgdTriggerError as exc:
        return [Check("warn", "api", f"no service at {where.url} ({where.how}): {exc}",
                      "start it: `igdtrigger serve`, `systemctl start igdtrigger` or "
                      "`docker compose up -d`; or pass --server")]
    out = [Check("ok", "api", f"service {health.get('version', '?')} answers at {where.url} "
                 f"({where.how})")]
    try:
        status = client.status()
    except ApiError as exc:
        if exc.status == 401:
            out.append(Check("ok", "api access", "status needs the admin token from here",
                             "pass --token or set IGDTRIGGER_TOKEN to read it; or set "
                             "[api] public_read = true on the service"))
            return out
        out.append(Check("warn", "api access", str(exc)))
        return out
    except IgdTriggerError as exc:
        out.append(Check("warn", "api access", str(exc)))
        return out
    gw = status.get("gateway", {})
    if gw.get("up"):
        out.append(Check("ok", "service's router", f"up ({gw.get('protocol')}, external "
                         f"{gw.get('external_address')})"))
    else:
        out.append(Check("FAIL", "service's router", f"down: {gw.get('error')}",
                         "see `igdtrigger status` and the service's log"))
    if isinstance(front := status.get("front"), dict):  # front: the IGD front (issue 14)
        from igdtrigger.front.serving import front_checks  # lazy: only with a front
        out.extend(Check(*c) for c in front_checks(front))
    for det in status.get("detectors", []):
        if det.get("name") == "conntrack":  # what the running service really sees
            out.append(Check("ok", "service's conntrack", f"sees flows: {det.get('detail')}")
                       if det.get("active") else
                       Check("warn", "service's conntrack", f"sees no flow: {det.get('reason')}",
                             "see the detectors section of the README; the socket table "
                             "stands in"))
    for warning in status.get("warnings", []):
        if not str(warning).startswith("detector conntrack inactive"):  # said just above
            out.append(Check("warn", "service", str(warning)))
    return out


def doctor(config_path: str | None, server: str | None, token: str | None,
           out: TextIO | None = None) -> int:
    """Run every check, printing each line as it is known; 1 if any failed."""
    out = out or sys.stdout
    failed = False

    def emit(*checks: Check) -> None:
        nonlocal failed
        for check in checks:
            failed = failed or check.level == "FAIL"
            print(check.line(), file=out, flush=True)

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        emit(Check("FAIL", "config", str(exc), "fix it (see examples/config.toml)"))
        return 1
    emit(check_config(config))
    caps = effective_capabilities()
    emit(check_privileges(config, caps))
    emit(*check_front(config, caps))
    emit(*check_detectors(config))
    emit(*check_gateway(config))
    emit(check_state_dir(config))
    emit(*check_api(config, server, token))
    return 1 if failed else 0


def healthcheck(config_path: str | None, server: str | None, *, ready: bool,
                timeout: float, out: TextIO | None = None) -> int:
    """0 when the service answers (and, with ``ready``, its router does); else 1."""
    out = out or sys.stdout

    url = server
    if url is None:
        try:
            url = load_config(config_path).api.url
        except ConfigError as exc:
            print(f"unhealthy: {exc}", file=out)
            return 1
    client = Client(url, timeout=timeout)
    path = "/readyz" if ready else "/healthz"
    try:
        data = client.request("GET", path)
    except IgdTriggerError as exc:
        print(f"unhealthy: {exc}", file=out)
        return 1
    print(f"healthy: {url}{path} {data}", file=out)
    return 0
