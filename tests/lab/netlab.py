"""Real-router test lab: network namespaces + Debian's miniupnpd (nftables backend).

Topology (see tests/lab/README.md)::

    LAN host(s)            router (miniupnpd)                       WAN host
    <p>-lan  eth0 ──── lanp0 ┐
    192.168.77.10/24         br0 192.168.77.1/24   wan0 11.22.33.1/24 ──── eth0 11.22.33.2/24
    <p>-lan2 eth0 ──── lanp1 ┘                                             <p>-wan
    192.168.77.11/24                       <p>-rtr

Nothing routes out of the namespaces: there is no link to the root namespace, the WAN host has
no default route and 11.22.33.0/24 exists only inside the lab.

Usage::

    with Lab() as lab:                      # or lab = Lab(...).start(); ...; lab.close()
        lab.run(lab.lan, ["upnpc", "-u", lab.igd_url, "-l"])
        assert not lab.probe("udp", 4000)

Usable from pytest (tests/lab/conftest.py) and from scripts under bench/. Needs root.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import functools
import importlib.util
import ipaddress
import itertools
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

__all__ = [
    "PREFIX",
    "Lab",
    "LabError",
    "MappingEntry",
    "Proto",
    "cleanup_stale",
    "lab_available",
    "lab_required",
]

Proto = Literal["udp", "tcp"]
Msg = dict[str, Any]

#: every namespace / temp dir the lab creates starts with this, followed by "<pid>-<seq>-"
PREFIX = "igdt-"
REQUIRE_ENV = "IGDTRIGGER_REQUIRE_LAB"

AGENT_SCRIPT = Path(__file__).with_name("probe_agent.py")
NETNS_DIR = Path("/run/netns")

LAN_NET = ipaddress.IPv4Network("192.168.77.0/24")
ROUTER_LAN_IP = "192.168.77.1"
FIRST_LAN_HOST = 10  # 192.168.77.10, .11, ...
ROUTER_WAN_IP = "11.22.33.1"  # public-looking (miniupnpd refuses private ones); lab-only
WAN_IP = "11.22.33.2"
WAN_PREFIXLEN = 24
HTTP_PORT = 5000
NATPMP_PORT = 5351

# interface names (per namespace, so they never collide between labs)
RTR_WAN_IF = "wan0"
RTR_LAN_IF = "br0"
HOST_IF = "eth0"

# nftables objects handed to miniupnpd through its config file
FILTER_TABLE = "igdt_filter"
NAT_TABLE = "igdt_nat"
FORWARD_CHAIN = "upnp_forward"
NAT_CHAIN = "upnp_prerouting"
POSTROUTING_CHAIN = "upnp_postrouting"
LAN_CT_TABLE = "igdt_ct"
LAN_FW_TABLE = "igdt_desktopfw"
LAN_FIREWALLS = ("ct", "none", "desktop")

_IPPROTO = {6: "TCP", 17: "UDP"}
_seq = itertools.count()


class LabError(RuntimeError):
    """The lab could not be built or did not behave (message says why)."""


@dataclass(frozen=True)
class MappingEntry:
    """One row of the router's UPnP port-mapping table (GetGenericPortMappingEntry)."""

    proto: str  # "UDP" / "TCP", as the router reports it
    ext_port: int
    int_client: str
    int_port: int
    desc: str
    enabled: bool
    remote_host: str
    lease: int  # remaining seconds; 0 = permanent

    def as_tuple(self) -> tuple[str, int, str, int, str]:
        return (self.proto, self.ext_port, self.int_client, self.int_port, self.desc)


# --------------------------------------------------------------------------------------------
# environment checks and stale-run cleanup
# --------------------------------------------------------------------------------------------


def _miniupnpd_path() -> str | None:
    return shutil.which("miniupnpd") or (
        "/usr/sbin/miniupnpd" if os.access("/usr/sbin/miniupnpd", os.X_OK) else None
    )


def lab_required() -> bool:
    """True when IGDTRIGGER_REQUIRE_LAB=1: lab tests must fail, not skip, if the lab can't run."""
    return os.environ.get(REQUIRE_ENV, "").strip() not in ("", "0", "no", "false")


@functools.cache
def lab_available() -> str | None:
    """None if the lab can run here, else a human-readable reason (cached per process)."""
    if not sys.platform.startswith("linux"):
        return f"not Linux ({sys.platform})"
    if os.geteuid() != 0:
        return "not root (the lab needs root for ip netns / nft / miniupnpd)"
    if shutil.which("ip") is None:
        return "ip missing (apt-get install iproute2)"
    if shutil.which("nft") is None:
        return "nft missing (apt-get install nftables)"
    mupnpd = _miniupnpd_path()
    if mupnpd is None:
        return "miniupnpd not installed (apt-get install miniupnpd-nftables)"
    try:
        ver = subprocess.run(
            [mupnpd, "--version"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"miniupnpd unusable: {e}"
    if "nftables" not in ver.stdout + ver.stderr:
        return "miniupnpd is not the nftables build (apt-get install miniupnpd-nftables)"
    if shutil.which("upnpc") is None:
        return "upnpc missing (apt-get install miniupnpc)"
    if shutil.which("conntrack") is None:
        return "conntrack missing (apt-get install conntrack)"
    if importlib.util.find_spec("miniupnpc") is None:
        return f"python module miniupnpc missing in {sys.executable}"
    # smoke test: a namespace with a veth pair and an nft table in it
    ns = f"{PREFIX}{os.getpid()}-chk"
    try:
        r = _ip_batch([f"netns add {ns}"])
        if r:
            return f"ip netns unavailable: {r}"
        r = _ip_batch([f"link add a0 netns {ns} type veth peer name b0 netns {ns}"])
        if r:
            return f"veth unavailable: {r}"
        p = subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "add table inet igdt_chk"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if p.returncode != 0:
            return f"nftables unusable in a namespace: {p.stderr.strip()}"
    finally:
        _ip_batch([f"netns del {ns}"])
    return None


def _ip_batch(lines: Sequence[str], ns: str | None = None) -> str:
    """Run `ip [-n ns] -batch -`; return '' on success else the error output."""
    argv = ["ip"] + (["-n", ns] if ns else []) + ["-batch", "-"]
    p = subprocess.run(
        argv, input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=30, check=False
    )
    return "" if p.returncode == 0 else (p.stderr or p.stdout).strip() or f"rc={p.returncode}"


def _list_netns() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _reap(pid: int) -> None:
    """Collect `pid` if it is a dead child of ours (an adopted daemon)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _kill_pid(pid: int, grace: float = 2.0) -> None:
    """SIGTERM, wait up to `grace` s, then SIGKILL; reap it if it is our child."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + wait
        while time.monotonic() < end:
            if not _pid_alive(pid):
                _reap(pid)
                return
            time.sleep(0.005)


_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37
_subreaper_lock = threading.Lock()


@contextlib.contextmanager
def _adopt_orphans() -> Iterator[None]:
    """Be a child subreaper while a daemon forks away, so the daemon becomes OUR child.

    Otherwise it is re-parented to init, and after we kill it, it lingers as a zombie until
    init gets round to reaping it (about 1 s in the CI VM): `pgrep miniupnpd` would still see
    it. Only the daemon that forks inside this window is adopted; the flag is then restored.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        yield
        return
    with _subreaper_lock:
        old = ctypes.c_int(0)
        if libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(old), 0, 0, 0) != 0:
            old.value = 1  # unknown: leave the flag alone
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        try:
            yield
        finally:
            if not old.value:
                libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _netns_pids(ns: str) -> list[int]:
    p = subprocess.run(
        ["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30, check=False
    )
    return [int(x) for x in p.stdout.split() if x.isdigit()]


def _destroy_netns(names: Sequence[str]) -> None:
    """Kill whatever still runs in the namespaces, then delete them."""
    pids = [pid for ns in names for pid in _netns_pids(ns) if pid != os.getpid()]
    killed = list(pids)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + 2.0
    while pids and time.monotonic() < end:
        pids = [p for p in pids if _pid_alive(p)]
        if pids:
            time.sleep(0.01)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in killed:
        if _comm(pid) == "miniupnpd":  # an adopted daemon (never a Popen someone waits on)
            _reap(pid)
    existing = set(_list_netns())
    _ip_batch([f"netns del {ns}" for ns in names if ns in existing])


def cleanup_stale() -> list[str]:
    """Remove namespaces/temp dirs left by lab runs whose process is gone. Returns ns names."""
    pat = re.compile(rf"^{re.escape(PREFIX)}(\d+)-")
    stale: list[str] = []
    for ns in _list_netns():
        m = pat.match(ns)
        if m and not _pid_alive(int(m.group(1))):
            stale.append(ns)
    if stale:
        _destroy_netns(stale)
    tmp = Path(tempfile.gettempdir())
    for d in tmp.glob(f"{PREFIX}*"):
        m = pat.match(d.name)
        if m and d.is_dir() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)
    return stale


# --------------------------------------------------------------------------------------------
# probe agents (tests/lab/probe_agent.py running inside a namespace)
# --------------------------------------------------------------------------------------------


class _Agent:
    def __init__(self, ns: str, proc: subprocess.Popen[bytes], errlog: Path) -> None:
        self.ns = ns
        self.proc = proc
        self.errlog = errlog
        self.buf = b""
        self.replies: dict[int, Msg] = {}
        self.events: list[Msg] = []
        self.hello = False
        self.eof = False
        self.listening: set[tuple[str, int]] = set()
        assert proc.stdout is not None
        assert proc.stdin is not None
        self.stdout: IO[bytes] = proc.stdout
        self.stdin: IO[bytes] = proc.stdin
        os.set_blocking(self.stdout.fileno(), False)

    def write(self, msg: Msg) -> None:
        try:
            self.stdin.write(json.dumps(msg).encode() + b"\n")
            self.stdin.flush()
        except (BrokenPipeError, ValueError) as e:
            raise LabError(f"probe agent in {self.ns} is gone: {self.stderr_tail()}") from e

    def feed(self) -> None:
        while True:
            try:
                chunk = os.read(self.stdout.fileno(), 65536)
            except BlockingIOError:
                break
            if not chunk:
                self.eof = True
                break
            self.buf += chunk
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            msg: Msg = json.loads(line)
            if msg.get("id") is not None:
                self.replies[int(msg["id"])] = msg
            elif msg.get("ev") == "hello":
                self.hello = True
            else:
                self.events.append(msg)

    def stderr_tail(self) -> str:
        try:
            return self.errlog.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.stdin.close()
        try:
            self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5.0)
        self.stdout.close()


# --------------------------------------------------------------------------------------------
# the lab
# --------------------------------------------------------------------------------------------


class Lab:
    """A LAN host (or several), a miniupnpd router and a WAN host in network namespaces.

    Nothing happens until :meth:`start` (or ``with Lab(...) as lab``). Options:

    secure_mode      miniupnpd secure_mode (clients may only map to their own address)
    igd_v1           start miniupnpd with ``-1`` (report InternetGatewayDevice:1)
    enable_upnp      False = NAT-PMP/PCP only (router_mappings() then raises; use nft_mappings())
    enable_natpmp    NAT-PMP + PCP on 192.168.77.1:5351 (2.3.1 has one switch for both)
    allow_low_ports  permit external/internal ports 1-1023 too (default: 1024-65535 only)
    perm_rules       extra miniupnpd permission lines, placed before the defaults
    lan_hosts        number of LAN hosts (192.168.77.10, .11, ...), all on a bridge
    lan_conntrack    add an nft ``ct state new`` rule in the LAN hosts' output hook so conntrack
                     (and its new-flow events) is active there (``lan_firewall="ct"``)
    lan_firewall     what the LAN hosts' own nftables hold: ``"ct"`` (the rule above),
                     ``"none"`` (nothing at all: a plain desktop, where the kernel tracks no
                     connection until something asks it to) or ``"desktop"`` (a stateful input
                     firewall as ufw/firewalld leave a desktop: policy drop, established and
                     loopback accepted, the lab's game ports 40000-40010 allowed). Default: from
                     ``lan_conntrack``. ``lan_ruleset()`` lists it.
    min_lifetime / max_lifetime   PCP/NAT-PMP lifetime clamps
    pcp_allow_thirdparty  PCP THIRD_PARTY option (mapping for another address) allowed
    notify_interval  SSDP NOTIFY interval (s)
    lease_file       keep miniupnpd's lease file (so a restart without flush keeps leases)
    router_debug     run miniupnpd in the foreground with ``-d`` and keep its log (router_log());
                     much slower, for debugging only
    extra_config     extra miniupnpd.conf lines
    ipv6             IPv6 everywhere from the start (enable_ipv6) and miniupnpd's IPv6 side on:
                     its WANIPv6FirewallControl service opens pinholes in the forward chain,
                     which otherwise drops every WAN -> LAN IPv6 packet (probe6 checks)
    ready_timeout    how long to wait for miniupnpd to answer
    """

    def __init__(
        self,
        *,
        secure_mode: bool = True,
        igd_v1: bool = False,
        enable_upnp: bool = True,
        enable_natpmp: bool = True,
        allow_low_ports: bool = False,
        perm_rules: Sequence[str] = (),
        lan_hosts: int = 1,
        lan_conntrack: bool = True,
        lan_firewall: str | None = None,
        min_lifetime: int = 120,
        max_lifetime: int = 86400,
        pcp_allow_thirdparty: bool = False,
        notify_interval: int = 60,
        lease_file: bool = True,
        router_debug: bool = False,
        extra_config: Sequence[str] = (),
        ready_timeout: float = 5.0,
        ipv6: bool = False,
    ) -> None:
        if not enable_upnp and not enable_natpmp:
            raise ValueError("enable_upnp and enable_natpmp cannot both be False")
        if not 1 <= lan_hosts <= 50:
            raise ValueError("lan_hosts must be 1..50")
        self.secure_mode = secure_mode
        self.igd_v1 = igd_v1
        self.enable_upnp = enable_upnp
        self.enable_natpmp = enable_natpmp
        self.allow_low_ports = allow_low_ports
        self.perm_rules = tuple(perm_rules)
        if lan_firewall is None:
            lan_firewall = "ct" if lan_conntrack else "none"
        if lan_firewall not in LAN_FIREWALLS:
            raise ValueError(f"lan_firewall must be one of {', '.join(LAN_FIREWALLS)}")
        self.lan_firewall = lan_firewall
        self.lan_conntrack = lan_firewall != "none"
        self.min_lifetime = min_lifetime
        self.max_lifetime = max_lifetime
        self.pcp_allow_thirdparty = pcp_allow_thirdparty
        self.notify_interval = notify_interval
        self.use_lease_file = lease_file
        self.router_debug = router_debug
        self.extra_config = tuple(extra_config)
        self.ready_timeout = ready_timeout
        self.ipv6 = ipv6
        self.ipv6_addrs: dict[str, str] = {}

        self.prefix = f"{PREFIX}{os.getpid()}-{next(_seq)}"
        self.router = f"{self.prefix}-rtr"
        self.wan = f"{self.prefix}-wan"
        self.lan_hosts: tuple[str, ...] = tuple(
            f"{self.prefix}-lan" if i == 0 else f"{self.prefix}-lan{i + 1}"
            for i in range(lan_hosts)
        )
        self.lan_ips: tuple[str, ...] = tuple(
            str(LAN_NET.network_address + FIRST_LAN_HOST + i) for i in range(lan_hosts)
        )
        self.lan = self.lan_hosts[0]
        self.lan_ip = self.lan_ips[0]
        self.lan_subnet = str(LAN_NET)
        self.router_lan_ip = ROUTER_LAN_IP
        self.router_wan_ip = ROUTER_WAN_IP
        self.wan_ip = WAN_IP
        self.router_lan_if = RTR_LAN_IF
        self.router_wan_if = RTR_WAN_IF
        self.host_if = HOST_IF
        self.http_port = HTTP_PORT
        self.natpmp_port = NATPMP_PORT
        self.igd_url = f"http://{ROUTER_LAN_IP}:{HTTP_PORT}/rootDesc.xml"
        self.uuid = str(uuid.uuid4())

        self.workdir = Path()
        self.config_path = Path()
        self.pidfile = Path()
        self.lease_path = Path()
        self._namespaces: list[str] = []
        self._extra_hosts: dict[str, str] = {}  # ip -> ns
        self._ip_to_ns: dict[str, str] = {}
        self._foreign: dict[tuple[str, int], str] = {}  # (PROTO, ext_port) -> ns that added it
        self._agents: dict[str, _Agent] = {}
        self._procs: list[subprocess.Popen[Any]] = []
        self._router_pid: int | None = None
        self._router_proc: subprocess.Popen[bytes] | None = None
        self._router_log: IO[bytes] | None = None
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._started = False
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> Lab:
        """Build namespaces, links, nftables; start probe agents and miniupnpd. Returns self."""
        with self._lock:
            if self._started:
                return self
            if self._closed:
                raise LabError("this Lab was closed; create a new one")
            reason = lab_available()
            if reason:
                raise LabError(f"lab unavailable: {reason}")
            self._started = True
            atexit.register(self.close)
            try:
                self._build()
            except BaseException:
                self.close()
                raise
            return self

    def close(self) -> None:
        """Stop everything this lab started and delete its namespaces (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            atexit.unregister(self.close)
            for agent in self._agents.values():
                with contextlib.suppress(Exception):
                    agent.close()
            self._agents.clear()
            for proc in self._procs:
                with contextlib.suppress(Exception):
                    if proc.poll() is None:
                        proc.terminate()
                        try:
                            proc.wait(timeout=2.0)
                        except subprocess.TimeoutExpired:
                            proc.kill()
                            proc.wait(timeout=5.0)
                with contextlib.suppress(Exception):
                    for stream in (proc.stdin, proc.stdout, proc.stderr):
                        if stream is not None:
                            stream.close()
            self._procs.clear()
            with contextlib.suppress(Exception):
                self.stop_router()
            if self._namespaces:
                _destroy_netns(self._namespaces)
                self._namespaces.clear()
            if self.workdir != Path() and self.workdir.name.startswith(PREFIX):
                shutil.rmtree(self.workdir, ignore_errors=True)

    # -- building ----------------------------------------------------------------------------
    def _build(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self.config_path = self.workdir / "miniupnpd.conf"
        self.pidfile = self.workdir / "miniupnpd.pid"
        self.lease_path = self.workdir / "miniupnpd.leases"

        all_ns = [self.router, self.wan, *self.lan_hosts]
        err = _ip_batch([f"netns add {ns}" for ns in all_ns])
        self._namespaces.extend(ns for ns in all_ns if ns in set(_list_netns()))
        if err:
            raise LabError(f"ip netns add failed: {err}")
        links = [
            f"link add {RTR_WAN_IF} netns {self.router} type veth peer name {HOST_IF} "
            f"netns {self.wan}"
        ]
        links += [
            f"link add {HOST_IF} netns {ns} type veth peer name lanp{i} netns {self.router}"
            for i, ns in enumerate(self.lan_hosts)
        ]
        err = _ip_batch(links)
        if err:
            raise LabError(f"creating veth pairs failed: {err}")

        (self.workdir / "router.nft").write_text(self._router_nft())
        ports = "".join(
            f"ip link set lanp{i} master {RTR_LAN_IF} up\n" for i in range(len(self.lan_hosts))
        )
        self._ns_script(
            self.router,
            f"""
            sysctl -q -w net.ipv4.ip_forward=1 net.ipv4.icmp_ratelimit=0 \
                net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
            if [ -d /proc/sys/net/bridge ]; then
                sysctl -q -w net.bridge.bridge-nf-call-iptables=0 \
                    net.bridge.bridge-nf-call-ip6tables=0 net.bridge.bridge-nf-call-arptables=0
            fi
            ip link set lo up
            ip link add {RTR_LAN_IF} type bridge forward_delay 0 stp_state 0 mcast_snooping 0
            {ports}
            ip addr add {ROUTER_LAN_IP}/{LAN_NET.prefixlen} dev {RTR_LAN_IF}
            ip link set {RTR_LAN_IF} up
            ip addr add {ROUTER_WAN_IP}/{WAN_PREFIXLEN} dev {RTR_WAN_IF}
            ip link set {RTR_WAN_IF} up
            nft -f {self.workdir / "router.nft"}
            """,
        )
        self._ns_script(
            self.wan,
            f"""
            sysctl -q -w net.ipv4.icmp_ratelimit=0 \
                net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
            ip link set lo up
            ip addr add {WAN_IP}/{WAN_PREFIXLEN} dev {HOST_IF}
            ip link set {HOST_IF} up
            """,
        )
        if self.lan_conntrack:
            (self.workdir / "lan.nft").write_text(self._lan_nft(self.lan_firewall))
        for ns, ip in zip(self.lan_hosts, self.lan_ips, strict=True):
            self._setup_lan_host(ns, ip, conntrack=self.lan_conntrack)

        for ns in (*self.lan_hosts, self.wan):
            self._agents[ns] = self._spawn_agent(ns)
        deadline = time.monotonic() + 10.0
        while not all(a.hello for a in self._agents.values()):
            if time.monotonic() > deadline:
                bad = [a for a in self._agents.values() if not a.hello]
                raise LabError(f"probe agent in {bad[0].ns} did not start: {bad[0].stderr_tail()}")
            self._pump(deadline)
        if self.ipv6:
            self.enable_ipv6()
        self.start_router()

    def _ns_script(self, ns: str, script: str) -> None:
        p = subprocess.run(
            ["ip", "netns", "exec", ns, "sh", "-ec", script],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if p.returncode != 0:
            raise LabError(f"setting up {ns} failed (rc={p.returncode}): {p.stderr.strip()}")

    def _setup_lan_host(self, ns: str, ip: str, *, conntrack: bool) -> None:
        nft = f"nft -f {self.workdir / 'lan.nft'}" if conntrack else ""
        # Ephemeral ports above every port a test maps and probes (40000-4xxxx): the service's
        # own outgoing sockets (SOAP, NAT-PMP, SSDP) could otherwise take a port the probe
        # listener then cannot bind (EADDRINUSE, seen once in a full run).
        self._ns_script(
            ns,
            f"""
            sysctl -q -w net.ipv4.icmp_ratelimit=0 \
                net.ipv4.ip_local_port_range="61000 65000" \
                net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
            ip link set lo up
            ip addr add {ip}/{LAN_NET.prefixlen} dev {HOST_IF}
            ip link set {HOST_IF} up
            ip route add default via {ROUTER_LAN_IP}
            {nft}
            """,
        )
        self._ip_to_ns[ip] = ns

    @staticmethod
    def _router_nft() -> str:
        # The shape of /etc/miniupnpd/nft_init.sh (Debian 2.3.1), with our own names, plus what
        # a real home router has: LAN->WAN forwarding, stateful return traffic, masquerade.
        return f"""
table inet {FILTER_TABLE} {{
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "{RTR_LAN_IF}" oifname "{RTR_WAN_IF}" accept
        jump {FORWARD_CHAIN}
    }}
    chain {FORWARD_CHAIN} {{
    }}
}}
table inet {NAT_TABLE} {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        jump {NAT_CHAIN}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        jump {POSTROUTING_CHAIN}
        oifname "{RTR_WAN_IF}" masquerade
    }}
    chain {NAT_CHAIN} {{
    }}
    chain {POSTROUTING_CHAIN} {{
    }}
}}
"""

    @staticmethod
    def _lan_nft(kind: str = "ct") -> str:
        if kind == "desktop":
            return f"""
table inet {LAN_FW_TABLE} {{
    chain input {{
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        iif "lo" accept
        meta l4proto icmp accept
        udp dport 40000-40010 accept
        tcp dport 40000-40010 accept
    }}
}}
"""
        # Any ct expression makes the kernel track connections in this namespace; this rule
        # is what makes NEW conntrack events fire for the host's own outbound flows.
        return f"""
table inet {LAN_CT_TABLE} {{
    chain output {{
        type filter hook output priority filter; policy accept;
        ct state new counter
    }}
}}
"""

    def _miniupnpd_conf(self) -> str:
        yn = {True: "yes", False: "no"}
        low = "1" if self.allow_low_ports else "1024"
        lines = [
            f"ext_ifname={RTR_WAN_IF}",
            f"listening_ip={RTR_LAN_IF}",
            f"http_port={self.http_port}",
            f"enable_upnp={yn[self.enable_upnp]}",
            f"enable_natpmp={yn[self.enable_natpmp]}",
            f"secure_mode={yn[self.secure_mode]}",
            f"pcp_allow_thirdparty={yn[self.pcp_allow_thirdparty]}",
            "system_uptime=yes",
            f"notify_interval={self.notify_interval}",
            f"ipv6_disable={yn[not self.ipv6]}",
            f"uuid={self.uuid}",
            "friendly_name=igdtrigger lab router",
            f"min_lifetime={self.min_lifetime}",
            f"max_lifetime={self.max_lifetime}",
            f"upnp_table_name={FILTER_TABLE}",
            f"upnp_nat_table_name={NAT_TABLE}",
            f"upnp_forward_chain={FORWARD_CHAIN}",
            f"upnp_nat_chain={NAT_CHAIN}",
            f"upnp_nat_postrouting_chain={POSTROUTING_CHAIN}",
        ]
        if self.use_lease_file:
            lines.append(f"lease_file={self.lease_path}")
        lines += self.extra_config
        lines += self.perm_rules
        lines += [
            f"allow {low}-65535 {LAN_NET} {low}-65535",
            "deny 0-65535 0.0.0.0/0 0-65535",
        ]
        return "\n".join(lines) + "\n"

    # -- running things in namespaces --------------------------------------------------------
    @staticmethod
    def netns_argv(ns: str, argv: Sequence[str]) -> list[str]:
        """The argv that runs `argv` inside namespace `ns` (for asyncio subprocesses etc.)."""
        return ["ip", "netns", "exec", ns, *argv]

    def run(
        self,
        ns: str,
        argv: Sequence[str],
        *,
        check: bool = False,
        timeout: float | None = 60.0,
        capture_output: bool = True,
        text: bool = True,
        **kw: Any,
    ) -> subprocess.CompletedProcess[Any]:
        """subprocess.run(argv) inside namespace `ns` (captures text output by default)."""
        return subprocess.run(
            self.netns_argv(ns, argv),
            check=check,
            timeout=timeout,
            capture_output=capture_output,
            text=text,
            **kw,
        )

    def popen(self, ns: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """subprocess.Popen(argv) inside `ns`; the process is terminated by close()."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self.netns_argv(ns, argv), **kw)
        with self._lock:
            self._procs.append(proc)
        return proc

    def python(
        self, ns: str, code: str, *, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[Any]:
        """Run a Python snippet with this interpreter inside `ns`."""
        return self.run(ns, [sys.executable, "-c", code], check=check, timeout=timeout)

    # -- the router ----------------------------------------------------------------------------
    def start_router(self) -> None:
        """Start miniupnpd (daemon mode, -P pidfile) and wait until it answers on the LAN."""
        with self._lock:
            if self.router_running():
                return
            mupnpd = _miniupnpd_path()
            assert mupnpd is not None
            self.config_path.write_text(self._miniupnpd_conf())
            self.pidfile.unlink(missing_ok=True)
            argv = [mupnpd, "-f", str(self.config_path), "-P", str(self.pidfile)]
            if self.igd_v1:
                argv.append("-1")
            if self.router_debug:
                self._router_log = (self.workdir / "miniupnpd.log").open("ab")
                self._router_proc = subprocess.Popen(
                    self.netns_argv(self.router, [*argv, "-d"]),
                    stdin=subprocess.DEVNULL,
                    stdout=self._router_log,
                    stderr=subprocess.STDOUT,
                )
            else:
                with _adopt_orphans():
                    p = self.run(self.router, argv, timeout=10)
                if p.returncode != 0:
                    out = (p.stderr + p.stdout).strip()
                    raise LabError(
                        f"miniupnpd exited with {p.returncode} (config {self.config_path}): "
                        + (out or self._diagnose())
                    )
            self._wait_router_ready()

    def _wait_router_ready(self) -> None:
        start = time.monotonic()
        deadline = start + self.ready_timeout
        agent = self._agents[self.lan]
        last: Msg = {}
        while time.monotonic() < deadline:
            if self._router_pid is None and self.pidfile.exists():
                # the daemon may not have written its pid yet: an empty file is "not yet"
                with contextlib.suppress(ValueError, IndexError, OSError):
                    self._router_pid = int(self.pidfile.read_text().split()[0])
            if self._router_proc is not None and self._router_proc.poll() is not None:
                break
            if self._router_pid is not None and not _pid_alive(self._router_pid):
                break
            if self.enable_upnp:
                last = self._request(
                    agent,
                    "http",
                    2.0,
                    host=ROUTER_LAN_IP,
                    port=self.http_port,
                    path="/rootDesc.xml",
                    timeout=0.25,
                )
                ready = last.get("status") == 200
            else:
                last = self._request(agent, "natpmp", 2.0, gateway=ROUTER_LAN_IP, timeout=0.25)
                ready = last.get("result") == 0
            if ready and (self._router_pid is not None or self._router_proc is not None):
                if self._router_pid is None and self._router_proc is not None:
                    self._router_pid = self._router_proc.pid
                return
            time.sleep(0.005)
        what = "died" if self._router_pid and not _pid_alive(self._router_pid) else "not ready"
        detail = self._diagnose()
        raise LabError(
            f"miniupnpd {what} after {time.monotonic() - start:.1f}s in {self.router} "
            f"(last check: {last}); config {self.config_path}:\n"
            f"{self._miniupnpd_conf()}{detail}"
        )

    def _diagnose(self) -> str:
        """Stop any instance, then run miniupnpd in the foreground (-d) briefly for its log."""
        self.stop_router()
        if self._router_log is not None:
            return (
                "\n--- miniupnpd -d log ---\n"
                + (self.workdir / "miniupnpd.log").read_text(errors="replace")[-4000:]
            )
        mupnpd = _miniupnpd_path() or "miniupnpd"
        argv = ["timeout", "-s", "TERM", "1.5", mupnpd, "-d", "-f", str(self.config_path)]
        argv += ["-P", str(self.workdir / "diag.pid")] + (["-1"] if self.igd_v1 else [])
        try:
            p = self.run(self.router, argv, timeout=10)
            out = (p.stdout or "") + (p.stderr or "")
        except subprocess.TimeoutExpired as e:
            out = f"(diagnostic run timed out: {e})"
        return "\n--- miniupnpd -d (foreground diagnostic run) ---\n" + out[-4000:]

    def stop_router(self) -> None:
        """Stop miniupnpd (SIGTERM, then SIGKILL). Its nft rules stay (it does not remove them)."""
        with self._lock:
            if self._router_proc is not None:
                if self._router_proc.poll() is None:
                    self._router_proc.terminate()
                    try:
                        self._router_proc.wait(timeout=3.0)
                    except subprocess.TimeoutExpired:
                        self._router_proc.kill()
                        self._router_proc.wait(timeout=5.0)
                self._router_proc = None
            if self._router_log is not None:
                self._router_log.close()
                self._router_log = None
            pid = self._router_pid
            if pid is None and self.pidfile != Path() and self.pidfile.exists():
                with contextlib.suppress(ValueError, IndexError, OSError):
                    pid = int(self.pidfile.read_text().split()[0])
            if pid is not None and self._is_miniupnpd(pid):
                _kill_pid(pid, grace=3.0)
            self._router_pid = None

    @staticmethod
    def _is_miniupnpd(pid: int) -> bool:
        return _comm(pid) == "miniupnpd"

    def flush_router_rules(self) -> None:
        """Empty miniupnpd's three nft chains (what a reboot does to a real router)."""
        self.run(
            self.router,
            [
                "nft",
                f"flush chain inet {FILTER_TABLE} {FORWARD_CHAIN}; "
                f"flush chain inet {NAT_TABLE} {NAT_CHAIN}; "
                f"flush chain inet {NAT_TABLE} {POSTROUTING_CHAIN}",
            ],
            check=True,
        )

    def restart_router(self, flush: bool = True) -> None:
        """Kill miniupnpd and start it again. flush=True also empties its nft chains and lease
        file, like a router reboot: every mapping is gone afterwards. flush=False keeps the nft
        rules (miniupnpd re-reads them; with lease_file=True their leases survive too)."""
        with self._lock:
            self.stop_router()
            if flush:
                self.flush_router_rules()
                self.lease_path.unlink(missing_ok=True)
            self.start_router()

    #: IPv6 inside the lab (public-looking prefixes that exist only in its namespaces)
    LAN6_PREFIX = "2a0c:5bc0::"
    WAN6_PREFIX = "2a0c:5bc1::"

    def enable_ipv6(self) -> dict[str, str]:
        """Give every namespace IPv6 (off by default): the router routes LAN6 <-> WAN6. Returns
        the addresses: {"router": ..., "wan": ..., <lan ns>: ...}."""
        on = "net.ipv6.conf.all.disable_ipv6=0 net.ipv6.conf.default.disable_ipv6=0"
        addrs = {"router": f"{self.LAN6_PREFIX}1", "wan": f"{self.WAN6_PREFIX}2"}
        self._ns_script(self.router, f"""
            sysctl -q -w {on} net.ipv6.conf.{RTR_LAN_IF}.disable_ipv6=0 \
                net.ipv6.conf.{RTR_WAN_IF}.disable_ipv6=0 net.ipv6.conf.all.forwarding=1
            ip -6 addr add {self.LAN6_PREFIX}1/64 dev {RTR_LAN_IF} nodad
            ip -6 addr add {self.WAN6_PREFIX}1/64 dev {RTR_WAN_IF} nodad
            """)
        self._ns_script(self.wan, f"""
            sysctl -q -w {on} net.ipv6.conf.{HOST_IF}.disable_ipv6=0
            ip -6 addr add {self.WAN6_PREFIX}2/64 dev {HOST_IF} nodad
            ip -6 route add default via {self.WAN6_PREFIX}1
            """)
        for i, ns in enumerate(self.lan_hosts):
            addr = f"{self.LAN6_PREFIX}{FIRST_LAN_HOST + i:x}"
            self._ns_script(ns, f"""
                sysctl -q -w {on} net.ipv6.conf.{HOST_IF}.disable_ipv6=0
                ip -6 addr add {addr}/64 dev {HOST_IF} nodad
                ip -6 route add default via {self.LAN6_PREFIX}1
                """)
            addrs[ns] = addr
        self.ipv6_addrs = addrs
        return addrs

    def move_router(self, http_port: int) -> None:
        """Reboot the router onto another HTTP port (as miniupnpd does when none is configured):
        its mappings are gone and its description is at a new URL (``igd_url`` follows)."""
        with self._lock:
            self.stop_router()
            self.flush_router_rules()
            self.lease_path.unlink(missing_ok=True)
            self.http_port = http_port
            self.igd_url = f"http://{ROUTER_LAN_IP}:{http_port}/rootDesc.xml"
            self.start_router()

    def router_pid(self) -> int | None:
        return self._router_pid

    def router_running(self) -> bool:
        return self._router_pid is not None and _pid_alive(self._router_pid)

    def router_log(self) -> str:
        """miniupnpd's log; only recorded with router_debug=True (it logs to syslog otherwise)."""
        path = self.workdir / "miniupnpd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- agents --------------------------------------------------------------------------------
    def _spawn_agent(self, ns: str) -> _Agent:
        errlog = self.workdir / f"agent-{ns}.err"
        with errlog.open("wb") as err:
            proc: subprocess.Popen[bytes] = subprocess.Popen(
                self.netns_argv(
                    ns, [sys.executable, "-u", str(AGENT_SCRIPT), "--max-lifetime", "7200"]
                ),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
            )
        return _Agent(ns, proc, errlog)

    def _pump(self, deadline: float) -> None:
        """Wait (until deadline at most) for output from any agent and dispatch it."""
        agents = [a for a in self._agents.values() if not a.eof]
        if not agents:
            raise LabError("all probe agents are gone")
        with selectors.DefaultSelector() as sel:
            for a in agents:
                sel.register(a.stdout.fileno(), selectors.EVENT_READ, a)
            for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
                agent: _Agent = key.data
                agent.feed()
                if agent.eof:
                    raise LabError(f"probe agent in {agent.ns} exited: {agent.stderr_tail()}")

    def _request(self, agent: _Agent, op: str, limit: float, /, **kw: Any) -> Msg:
        rid = next(self._ids)
        agent.write({"id": rid, "op": op, **kw})
        deadline = time.monotonic() + limit
        while rid not in agent.replies:
            if time.monotonic() >= deadline:
                raise LabError(f"probe agent in {agent.ns} did not answer {op!r} in {limit}s")
            self._pump(deadline)
        reply = agent.replies.pop(rid)
        if reply.get("error") and op not in ("http", "natpmp"):
            raise LabError(f"{op} in {agent.ns} failed: {reply['error']}")
        return reply

    def _host_agent(self, host: int | str) -> _Agent:
        ns = self.lan_hosts[host] if isinstance(host, int) else host
        try:
            return self._agents[ns]
        except KeyError:
            raise LabError(f"no probe agent in {ns!r} (only LAN hosts have one)") from None

    # -- probing -------------------------------------------------------------------------------
    def probe(
        self,
        proto: Proto,
        port: int,
        timeout: float = 1.0,
        *,
        host: int | str = 0,
        internal_port: int | None = None,
    ) -> bool:
        """Does a packet from the WAN host to router_wan_ip:`port` reach a listener on the LAN
        host (`host`: index into lan_hosts or its ns name) at `internal_port` (default: port)?

        Every probe uses a fresh WAN source port, so the router's conntrack never replays an
        older NAT decision. Returns early (False) on ICMP port-unreachable / TCP RST; otherwise
        waits up to `timeout` s for delivery.
        """
        if proto not in ("udp", "tcp"):
            raise ValueError(f"proto must be 'udp' or 'tcp', not {proto!r}")
        iport = port if internal_port is None else internal_port
        with self._lock:
            lan = self._host_agent(host)
            wan = self._agents[self.wan]
            self.listen(proto, iport, host=host)
            lan.events.clear()
            wan.events.clear()
            start = time.monotonic()
            reply = self._request(
                wan, "send", 5.0, proto=proto, dst=ROUTER_WAN_IP, port=port, wait=timeout
            )
            sport = int(reply["sport"])
            rid = int(reply["id"])
            deadline = start + timeout
            while True:
                for ev in lan.events:
                    if (
                        ev.get("ev") == "recv"
                        and ev.get("proto") == proto
                        and ev.get("port") == iport
                        and ev.get("src") == WAN_IP
                        and ev.get("sport") == sport
                    ):
                        return True
                for ev in wan.events:
                    if ev.get("ref") == rid and ev.get("result") in ("refused", "error"):
                        return False
                if time.monotonic() >= deadline:
                    return False
                self._pump(deadline)

    async def aprobe(
        self,
        proto: Proto,
        port: int,
        timeout: float = 1.0,
        *,
        host: int | str = 0,
        internal_port: int | None = None,
    ) -> bool:
        """probe() in a worker thread, for async tests."""
        return await asyncio.to_thread(
            self.probe, proto, port, timeout, host=host, internal_port=internal_port
        )

    def probe6(self, proto: Proto, port: int, timeout: float = 1.0, *,
               host: int | str = 0) -> bool:
        """Does a packet from the WAN host to the LAN host's own IPv6 address:`port` get
        through the router (no NAT on IPv6: only a pinhole in its firewall lets it in)? A fresh
        socket each time, so no earlier flow's firewall state lets it through."""
        if proto not in ("udp", "tcp"):
            raise ValueError(f"proto must be 'udp' or 'tcp', not {proto!r}")
        ns = self.lan_hosts[host] if isinstance(host, int) else host
        dst = self.ipv6_addrs.get(ns)
        if dst is None:
            raise LabError("probe6 needs IPv6: Lab(ipv6=True) or enable_ipv6() first")
        kind = "SOCK_DGRAM" if proto == "udp" else "SOCK_STREAM"
        recv = ("d, a = s.recvfrom(64)" if proto == "udp" else
                "s.listen(1)\nprint('ready', flush=True)\nc, a = s.accept()")
        ready = "" if proto == "tcp" else "print('ready', flush=True)\n"
        listener = (
            "import socket, sys\n"
            f"s = socket.socket(socket.AF_INET6, socket.{kind})\n"
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            "s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)\n"  # IPv4 listeners stay
            f"s.bind(('::', {port}))\n"
            f"s.settimeout({timeout + 2.0})\n"
            f"{ready}"
            "try:\n"
            + "".join(f"    {line}\n" for line in recv.split("\n"))
            + "    print('got', a[0], flush=True)\n"
            "except OSError as e:\n"
            "    print('none', e, flush=True)\n"
        )
        if proto == "udp":
            send = (f"s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
                    f"s.sendto(b'probe', ({dst!r}, {port}))\n")
        else:
            send = (f"s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)\n"
                    f"s.settimeout({timeout})\ns.connect_ex(({dst!r}, {port}))\n")
        proc = self.popen(ns, [sys.executable, "-c", listener], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            if not first.startswith("ready"):
                rest, _ = proc.communicate(timeout=5)
                raise LabError(f"IPv6 listener in {ns} did not start: {first}{rest}")
            self.run(self.wan, [sys.executable, "-c", "import socket\n" + send],
                     timeout=timeout + 10)
            out: str = proc.communicate(timeout=timeout + 5)[0]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        return out.startswith(f"got {self.ipv6_addrs['wan']}")

    def nft_pinholes(self) -> list[str]:
        """The router's pinhole rules: miniupnpd's forward-chain rules that match an IPv6
        destination address (``@nh,192,128``; its IPv4 mapping rules match ``@nh,128,32``)."""
        p = self.run(self.router, ["nft", "list", "chain", "inet", FILTER_TABLE, FORWARD_CHAIN])
        return [line.strip() for line in p.stdout.splitlines() if "@nh,192,128 " in line]

    def listen(self, proto: Proto, port: int, *, host: int | str = 0) -> None:
        """Make the LAN host's probe agent listen on proto/port (probe() does this itself)."""
        with self._lock:
            agent = self._host_agent(host)
            if (proto, port) not in agent.listening:
                self._request(agent, "listen", 5.0, proto=proto, port=port)
                agent.listening.add((proto, port))

    def stop_listening(self, proto: Proto, port: int, *, host: int | str = 0) -> None:
        """Release a port the probe listener holds (e.g. before the service binds it)."""
        with self._lock:
            agent = self._host_agent(host)
            if (proto, port) in agent.listening:
                self._request(agent, "unlisten", 5.0, proto=proto, port=port)
                agent.listening.discard((proto, port))

    # -- the router's tables -------------------------------------------------------------------
    def router_mapping_entries(self) -> list[MappingEntry]:
        """The router's UPnP mapping table, read with miniupnpc from the first LAN host."""
        if not self.enable_upnp:
            raise LabError("UPnP is disabled in this lab (enable_upnp=False); use nft_mappings()")
        with self._lock:
            reply = self._request(self._agents[self.lan], "upnp_list", 10.0, url=self.igd_url)
        return [
            MappingEntry(
                proto=str(r[0]),
                ext_port=int(r[1]),
                int_client=str(r[2]),
                int_port=int(r[3]),
                desc=str(r[4]),
                enabled=str(r[5]) in ("1", "True", "true"),
                remote_host=str(r[6] or ""),
                lease=int(r[7] or 0),
            )
            for r in reply["mappings"]
        ]

    def router_mappings(self) -> list[tuple[str, int, str, int, str]]:
        """(proto "UDP"/"TCP", external port, internal client, internal port, description)."""
        return [e.as_tuple() for e in self.router_mapping_entries()]

    def nft_mappings(self) -> list[tuple[str, int, str, int]]:
        """(proto, external port, internal client, internal port) straight from the router's
        DNAT chain: what the kernel will actually do. Works with enable_upnp=False too."""
        p = self.run(
            self.router, ["nft", "-j", "list", "chain", "inet", NAT_TABLE, NAT_CHAIN], check=True
        )
        out: list[tuple[str, int, str, int]] = []
        for item in json.loads(p.stdout)["nftables"]:
            rule = item.get("rule")
            if not rule:
                continue
            proto, eport, addr, iport = "", 0, "", 0
            for expr in rule.get("expr", []):
                if "match" in expr:
                    left, right = expr["match"]["left"], expr["match"]["right"]
                    payload = left.get("payload", {}) if isinstance(left, dict) else {}
                    if payload.get("base") == "nh" and payload.get("offset") == 72:
                        proto = _IPPROTO.get(int(right), str(right))
                    elif payload.get("field") == "dport":
                        eport = int(right)
                    elif payload.get("protocol") in ("tcp", "udp") and "field" not in payload:
                        proto = str(payload["protocol"]).upper()
                elif "dnat" in expr:
                    addr = str(expr["dnat"].get("addr", ""))
                    iport = int(expr["dnat"].get("port", 0))
            if proto and eport:
                out.append((proto, eport, addr, iport))
        return out

    def add_foreign_mapping(
        self,
        proto: Proto | str,
        ext_port: int,
        int_client: str,
        int_port: int | None = None,
        *,
        desc: str = "igdt-lab foreign",
        lease: int = 0,
    ) -> None:
        """Create a mapping that belongs to someone else, with `upnpc`.

        It is requested from a host that owns `int_client` (an existing LAN host, or an extra
        host added on the fly with that address when secure_mode is on), or from the first LAN
        host when secure_mode is off. Raises LabError if the router refuses.
        """
        proto_u = proto.upper()
        iport = ext_port if int_port is None else int_port
        with self._lock:
            ns = self._ip_to_ns.get(int_client)
            if ns is None:
                ns = self.add_lan_host(int_client) if self.secure_mode else self.lan
            p = self.run(
                ns,
                [
                    "upnpc",
                    "-u",
                    self.igd_url,
                    "-e",
                    desc,
                    "-a",
                    int_client,
                    str(iport),
                    str(ext_port),
                    proto_u,
                    str(lease),
                ],
                timeout=30,
            )
            # upnpc's exit code is unreliable (0 on some failures): check its output
            if "is redirected to internal" not in p.stdout:
                raise LabError(f"upnpc -a failed in {ns}: {p.stdout[-600:]}{p.stderr[-600:]}")
            self._foreign[(proto_u, ext_port)] = ns

    def delete_foreign_mapping(self, proto: Proto | str, ext_port: int) -> None:
        """Delete a mapping with `upnpc -d`, from the host that added it (default: LAN host)."""
        proto_u = proto.upper()
        with self._lock:
            ns = self._foreign.pop((proto_u, ext_port), self.lan)
            p = self.run(ns, ["upnpc", "-u", self.igd_url, "-d", str(ext_port), proto_u])
            if p.returncode != 0 or "failed" in p.stdout:
                raise LabError(f"upnpc -d failed in {ns}: {p.stdout[-600:]}{p.stderr[-600:]}")

    def lan_ruleset(self, host: int | str = 0) -> str:
        """``nft list ruleset`` in a LAN host's namespace."""
        ns = self.lan_hosts[host] if isinstance(host, int) else host
        p = self.run(ns, ["nft", "list", "ruleset"], check=True)
        return str(p.stdout)

    def add_lan_host(self, ip: str) -> str:
        """Attach another host with address `ip` (in 192.168.77.0/24) to the LAN bridge.
        Returns its namespace. No probe agent runs there."""
        with self._lock:
            addr = ipaddress.IPv4Address(ip)
            reserved = (LAN_NET.network_address, LAN_NET.broadcast_address)
            if addr not in LAN_NET or ip == ROUTER_LAN_IP or addr in reserved:
                raise ValueError(f"{ip} is not a free host address in {LAN_NET}")
            if ip in self._ip_to_ns:
                return self._ip_to_ns[ip]
            octet = ip.rsplit(".", 1)[1]
            ns = f"{self.prefix}-h{octet}"
            err = _ip_batch([f"netns add {ns}"])
            if err:
                raise LabError(f"ip netns add {ns} failed: {err}")
            self._namespaces.append(ns)
            err = _ip_batch(
                [f"link add {HOST_IF} netns {ns} type veth peer name hp{octet} netns {self.router}"]
            )
            if err:
                raise LabError(f"veth for {ns} failed: {err}")
            err = _ip_batch([f"link set hp{octet} master {RTR_LAN_IF} up"], ns=self.router)
            if err:
                raise LabError(f"bridging {ns} failed: {err}")
            self._setup_lan_host(ns, ip, conntrack=False)
            self._extra_hosts[ip] = ns
            return ns

    def __repr__(self) -> str:
        state = "closed" if self._closed else "started" if self._started else "new"
        return f"<Lab {self.prefix} {state} secure_mode={self.secure_mode} igd_v1={self.igd_v1}>"
