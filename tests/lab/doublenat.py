"""Double-NAT lab for the IGD front (issue 14): a home router behind the ISP's router.

Built on :class:`tests.lab.netlab.Lab` (whose topology is unchanged): its miniupnpd router is
the ISP router (secure_mode on, public-looking WAN address 11.22.33.1 that exists only in the
namespaces), its first LAN host becomes the home router, and a second LAN behind the home
router holds the clients::

    WAN host          ISP router (miniupnpd)       home router (igdtrigger)    clients
    <p>-wan           <p>-rtr                      <p>-lan                     <p>-cl1, -cl2
    eth0 11.22.33.2 - wan0 11.22.33.1
                      br0 192.168.77.1 ----------- eth0 192.168.77.10
                                                   br-lan 10.8.0.1/24 -------- eth0 10.8.0.10
                                                                     +-------- eth0 10.8.0.11

The home router forwards IPv4 and masquerades the client LAN out of ``eth0`` (table
``ip igdt_home``, with a forward chain of policy ``accept`` by default, or ``drop`` with only
established flows accepted: a firewall that drops DNATed traffic, for ``forward_chain`` and the
doctor check). Each client has a probe agent, so ``probe(proto, port, client=i)`` tells whether
a WAN packet to the ISP router's external address reaches that client.

Usage::

    with Lab() as lab:
        net = DoubleNat(lab).build()
        net.natpmpc(0, "-a", "40002", "40002", "udp", "60")
        assert net.probe("udp", 40002)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.lab.netlab import HOST_IF, Lab, LabError, Proto, _ip_batch

__all__ = ["CLIENT_NET", "HOME_LAN_IF", "HOME_LAN_IP", "DoubleNat", "FrontServe"]

ROOT = Path(__file__).resolve().parents[2]
HOME_LAN_IF = "br-lan"
HOME_LAN_IP = "10.8.0.1"
CLIENT_NET = "10.8.0.0/24"
FIRST_CLIENT = 10
HOME_TABLE = "igdt_home"


class DoubleNat:
    """The client LAN behind ``lab.lan`` (the home router). ``forward_policy``: the home
    router's forward chain policy, ``"accept"`` or ``"drop"`` (established/related only)."""

    def __init__(self, lab: Lab, *, clients: int = 2, forward_policy: str = "accept") -> None:
        if forward_policy not in ("accept", "drop"):
            raise ValueError("forward_policy must be 'accept' or 'drop'")
        if not 1 <= clients <= 20:
            raise ValueError("clients must be 1..20")
        self.lab = lab
        self.home = lab.lan
        self.home_wan_ip = lab.lan_ip
        self.home_lan_ip = HOME_LAN_IP
        self.forward_policy = forward_policy
        self.clients = [f"{lab.prefix}-cl{i + 1}" for i in range(clients)]
        self.client_ips = [f"10.8.0.{FIRST_CLIENT + i}" for i in range(clients)]
        self.external_ip = lab.router_wan_ip

    def build(self) -> DoubleNat:
        lab = self.lab
        err = _ip_batch([f"netns add {ns}" for ns in self.clients])
        lab._namespaces.extend(self.clients)  # closed (deleted) with the lab
        if err:
            raise LabError(f"ip netns add failed: {err}")
        err = _ip_batch([f"link add {HOST_IF} netns {ns} type veth peer name cl{i} netns "
                         f"{self.home}" for i, ns in enumerate(self.clients)])
        if err:
            raise LabError(f"client veth pairs failed: {err}")
        ports = "".join(f"ip link set cl{i} master {HOME_LAN_IF} up\n"
                        for i in range(len(self.clients)))
        nft = lab.workdir / "home.nft"
        nft.write_text(self.home_nft())
        lab._ns_script(self.home, f"""
            sysctl -q -w net.ipv4.ip_forward=1
            if [ -d /proc/sys/net/bridge ]; then
                sysctl -q -w net.bridge.bridge-nf-call-iptables=0
            fi
            ip link add {HOME_LAN_IF} type bridge forward_delay 0 stp_state 0
            {ports}
            ip addr add {HOME_LAN_IP}/24 dev {HOME_LAN_IF}
            ip link set {HOME_LAN_IF} up
            nft -f {nft}
            """)
        for ns, ip in zip(self.clients, self.client_ips, strict=True):
            lab._ns_script(ns, f"""
                sysctl -q -w net.ipv4.icmp_ratelimit=0 \
                    net.ipv4.ip_local_port_range="61000 65000" \
                    net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
                ip link set lo up
                ip addr add {ip}/24 dev {HOST_IF}
                ip link set {HOST_IF} up
                ip route add default via {HOME_LAN_IP}
                """)
            lab._agents[ns] = lab._spawn_agent(ns)
        deadline = time.monotonic() + 10.0
        while not all(lab._agents[ns].hello for ns in self.clients):
            if time.monotonic() > deadline:
                raise LabError("probe agents in the client namespaces did not start")
            lab._pump(deadline)
        return self

    def home_nft(self) -> str:
        forward = ("" if self.forward_policy == "accept" else
                   "        ct state established,related accept\n"
                   f"        iifname \"{HOME_LAN_IF}\" accept\n")
        return f"""
table ip {HOME_TABLE} {{
    chain forward {{
        type filter hook forward priority filter; policy {self.forward_policy};
{forward}    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{HOST_IF}" ip saddr {CLIENT_NET} masquerade
    }}
}}
"""

    # -- asking ------------------------------------------------------------------------------
    def probe(self, proto: Proto, port: int, timeout: float = 1.0, *, client: int = 0,
              internal_port: int | None = None) -> bool:
        """Does a WAN packet to the ISP router's external address:``port`` reach the client?"""
        return self.lab.probe(proto, port, timeout, host=self.clients[client],
                              internal_port=internal_port)

    def run(self, client: int, argv: Sequence[str], timeout: float = 60.0,
            ) -> subprocess.CompletedProcess[str]:
        p: subprocess.CompletedProcess[str] = self.lab.run(self.clients[client], argv,
                                                           timeout=timeout)
        return p

    def upnpc(self, client: int, *args: str) -> subprocess.CompletedProcess[str]:
        """Debian's ``upnpc`` on a client (it finds the home router by SSDP)."""
        return self.run(client, ["upnpc", *args])

    def natpmpc(self, client: int, *args: str) -> subprocess.CompletedProcess[str]:
        """Debian's ``natpmpc`` on a client, talking to the home router."""
        return self.run(client, ["natpmpc", "-g", HOME_LAN_IP, *args])

    def home_dnat(self) -> list[str]:
        """The inner DNAT rules igdtrigger keeps on the home router (``ip igdtrigger_front``)."""
        p = self.lab.run(self.home, ["nft", "-j", "list", "table", "ip", "igdtrigger_front"])
        if p.returncode != 0:
            return []
        return [json.dumps(item["rule"]["expr"]) for item in json.loads(p.stdout)["nftables"]
                if "rule" in item and item["rule"].get("chain") == "prerouting"]

    def home_ruleset(self) -> str:
        return str(self.lab.run(self.home, ["nft", "list", "ruleset"], check=True).stdout)

    def upstream(self) -> list[tuple[str, int, str, int]]:
        """The ISP router's DNAT table: (proto, external port, internal client, internal port)."""
        return self.lab.nft_mappings()


def missing_tools() -> list[str]:
    """The Debian packages the front's lab needs that are not installed."""
    return [pkg for tool, pkg in (("upnpc", "miniupnpc"), ("natpmpc", "natpmpc"))
            if shutil.which(tool) is None]


def front_config(net: DoubleNat, state: Path, *, allow: Sequence[str] = (),
                 idle: str = "10m", max_lease: str = "1h", forward_chain: str | None = None,
                 extra: str = "", interface: str = HOME_LAN_IF) -> str:
    """``serve``'s config on ``net.home``; ``interface``: the one served (topology 2 on the
    lab's LAN host, a ``DoubleNat`` never built: its ``eth0``)."""
    lines = ", ".join(json.dumps(a) for a in allow)
    chain = f'forward_chain = "{forward_chain}"\n' if forward_chain else ""
    allow_line = f"allow = [{lines}]\n" if allow else ""
    return f"""
[gateway]
url = "{net.lab.igd_url}"
lease = "1h"

[api]
listen = "127.0.0.1:8731"

[service]
state_dir = "{state}"

[front]
enabled = true
interfaces = ["{interface}"]
max_lease = "{max_lease}"
idle_timeout = "{idle}"
{allow_line}{chain}{extra}
"""


class FrontServe:
    """``igdtrigger serve`` with ``[front]`` on the home router."""

    def __init__(self, net: DoubleNat, tmp: Path, **cfg: Any) -> None:
        self.net = net
        self.state = tmp / "state"
        self.config = tmp / "front.toml"
        self.config.write_text(front_config(net, self.state, **cfg))
        self.ready = tmp / "ready"
        self.log = tmp / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(ROOT), "IGDTRIGGER_TOKEN": ""}

    def start(self, timeout: float = 30.0) -> FrontServe:
        self.ready.unlink(missing_ok=True)
        with self.log.open("ab") as logf:
            self.proc = self.net.lab.popen(
                self.net.home, [sys.executable, "-m", "igdtrigger", "serve", "--config",
                                str(self.config), "--ready-file", str(self.ready)],
                env=self.env(), stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_until(lambda: self.ready.exists() or self.proc is None or
                   self.proc.poll() is not None, timeout, "igdtrigger serve to start",
                   self.logtext)
        if self.proc.poll() is not None:
            raise LabError(f"igdtrigger serve exited: {self.logtext()[-3000:]}")
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def logtext(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``igdtrigger ARGS --server <its API>`` on the home router."""
        p: subprocess.CompletedProcess[str] = self.net.lab.run(
            self.net.home, [sys.executable, "-m", "igdtrigger", *args, "--server",
                            "http://127.0.0.1:8731"], env=self.env(), cwd=ROOT, timeout=60)
        return p

    def status(self) -> dict[str, Any]:
        p = self.cli("status", "--json")
        if p.returncode != 0:
            raise LabError(f"igdtrigger status failed: {p.stdout}{p.stderr}")
        data: dict[str, Any] = json.loads(p.stdout)
        return data


def wait_until(pred: Callable[[], bool], timeout: float, what: str,
               detail: Callable[[], str] = str, step: float = 0.1) -> float:
    """Poll ``pred`` until true (returns the seconds it took); ``LabError`` after ``timeout``."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise LabError(f"timed out after {timeout}s waiting for {what}: {detail()[-3000:]}")
        time.sleep(step)
    return time.monotonic() - t0
