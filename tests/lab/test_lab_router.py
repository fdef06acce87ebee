"""The lab is the ground truth: plain miniupnpc (run inside the LAN host) against the real
miniupnpd, checked with packets from the WAN host. No igdtrigger code is involved here."""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.lab.netlab import Lab, Proto, cleanup_stale

pytestmark = pytest.mark.lab

PORT = 40000

PRELUDE = """
import miniupnpc
u = miniupnpc.UPnP()
u.selectigd({url!r})
def attempt(f, *a):
    try:
        print("OK", f(*a))
    except Exception as e:
        print("ERR", e)
"""


def upnp(lab: Lab, body: str, host: int = 0) -> str:
    """Run miniupnpc code inside a LAN host; `u` is the selected IGD. Returns stdout."""
    p = lab.run(lab.lan_hosts[host], [sys.executable, "-c", PRELUDE.format(url=lab.igd_url) + body])
    assert p.returncode == 0, p.stderr
    return str(p.stdout)


def add(lab: Lab, proto: Proto, port: int, client: str | None = None, host: int = 0) -> str:
    client = client or lab.lan_ips[host]
    return upnp(
        lab,
        f"attempt(u.addportmapping, {port}, {proto.upper()!r}, {client!r}, {port}, 't', '')",
        host,
    ).strip()


def delete(lab: Lab, proto: Proto, port: int, host: int = 0) -> str:
    return upnp(lab, f"attempt(u.deleteportmapping, {port}, {proto.upper()!r})", host).strip()


# -- the probe itself ------------------------------------------------------------------------


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_nothing_is_forwarded_before_any_mapping(lab: Lab, proto: Proto) -> None:
    assert lab.router_mappings() == []
    assert lab.nft_mappings() == []
    assert not lab.probe(proto, PORT)
    # the LAN listener really is there: a mapping makes the very same probe succeed
    assert add(lab, proto, PORT) == "OK True"
    assert lab.probe(proto, PORT)


def test_probe_negative_cases_are_real(make_lab: Callable[..., Lab]) -> None:
    """Delivery to the wrong host / port, or to nobody, must read as False."""
    lab = make_lab(lan_hosts=2, secure_mode=False)
    assert add(lab, "udp", PORT, client=lab.lan_ips[1]) == "OK True"
    assert lab.probe("udp", PORT, host=1)
    assert not lab.probe("udp", PORT, host=0, timeout=0.3)
    assert not lab.probe("udp", PORT, host=1, internal_port=PORT + 1, timeout=0.3)
    # mapped to an address nobody has: no ICMP comes back, the timeout path answers
    assert add(lab, "tcp", PORT, client="192.168.77.99") == "OK True"
    start = time.monotonic()
    assert not lab.probe("tcp", PORT, timeout=0.3)
    assert time.monotonic() - start >= 0.29


# -- (a) add / delete, UDP and TCP -----------------------------------------------------------


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_add_then_delete_mapping(lab: Lab, proto: Proto) -> None:
    assert not lab.probe(proto, PORT)
    assert add(lab, proto, PORT) == "OK True"
    assert lab.router_mappings() == [(proto.upper(), PORT, lab.lan_ip, PORT, "t")]
    assert lab.nft_mappings() == [(proto.upper(), PORT, lab.lan_ip, PORT)]
    assert lab.probe(proto, PORT)
    assert lab.probe(proto, PORT)  # repeatable
    other: Proto = "tcp" if proto == "udp" else "udp"
    assert not lab.probe(other, PORT)  # only the mapped protocol is forwarded

    assert delete(lab, proto, PORT) == "OK True"
    assert lab.router_mappings() == []
    assert lab.nft_mappings() == []
    # conntrack still holds the earlier forwarded flows: a probe reusing their source port would
    # still be delivered. Fresh source ports make this False.
    assert not lab.probe(proto, PORT)


def test_mapping_entries_carry_lease(lab: Lab) -> None:
    out = upnp(lab, f"attempt(u.addportmapping, {PORT}, 'UDP', {lab.lan_ip!r}, 5000, 'd', '', 300)")
    assert out.strip() == "OK True"
    [entry] = lab.router_mapping_entries()
    assert (entry.proto, entry.ext_port, entry.int_client, entry.int_port) == (
        "UDP",
        PORT,
        lab.lan_ip,
        5000,
    )
    assert entry.enabled
    assert 290 <= entry.lease <= 300
    assert lab.probe("udp", PORT, internal_port=5000)
    assert not lab.probe("udp", PORT, timeout=0.3)  # nothing listens on 40000 inside


# -- (c) IGDv1 -------------------------------------------------------------------------------


def test_igdv1_mode(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(igd_v1=True)
    desc = lab.run(lab.lan, ["upnpc", "-u", lab.igd_url, "-l"]).stdout
    assert "Found valid IGD" in desc
    xml = lab.run(
        lab.lan,
        [
            sys.executable,
            "-c",
            f"import urllib.request;print(urllib.request.urlopen({lab.igd_url!r}).read().decode())",
        ],
    ).stdout
    assert "urn:schemas-upnp-org:device:InternetGatewayDevice:1" in xml
    assert "urn:schemas-upnp-org:service:WANIPConnection:1" in xml
    assert "InternetGatewayDevice:2" not in xml
    for proto in ("udp", "tcp"):
        assert not lab.probe(proto, PORT)
        assert add(lab, proto, PORT) == "OK True"
        assert lab.probe(proto, PORT)
        assert delete(lab, proto, PORT) == "OK True"
        assert not lab.probe(proto, PORT)


def test_default_lab_is_igdv2(lab: Lab) -> None:
    xml = lab.run(
        lab.lan,
        [
            sys.executable,
            "-c",
            f"import urllib.request;print(urllib.request.urlopen({lab.igd_url!r}).read().decode())",
        ],
    ).stdout
    assert "urn:schemas-upnp-org:device:InternetGatewayDevice:2" in xml


# -- (d) secure mode ---------------------------------------------------------------------------


def test_secure_mode_refuses_mapping_for_another_client(lab: Lab) -> None:
    out = add(lab, "udp", PORT, client="192.168.77.99")
    # miniupnpd 2.3.1 answers 718 ConflictInMappingEntry (older ones: 606 Action not authorized)
    assert out.startswith("ERR"), out
    assert "ConflictInMappingEntry" in out or "not authorized" in out.lower() or "606" in out
    assert lab.router_mappings() == []
    assert lab.nft_mappings() == []


def test_without_secure_mode_the_same_request_is_accepted(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(secure_mode=False)
    assert add(lab, "udp", PORT, client="192.168.77.99") == "OK True"
    assert lab.router_mappings() == [("UDP", PORT, "192.168.77.99", PORT, "t")]


def test_low_ports_need_allow_low_ports(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab()
    assert "not authorized" in add(lab, "tcp", 80).lower()
    lab2 = make_lab(allow_low_ports=True)
    assert add(lab2, "tcp", 80) == "OK True"
    assert lab2.probe("tcp", 80)


# -- foreign mappings (someone else's) -------------------------------------------------------


def test_add_foreign_mapping_in_secure_mode(lab: Lab) -> None:
    lab.add_foreign_mapping("udp", PORT, "192.168.77.99", 41000, desc="other box")
    assert lab.router_mappings() == [("UDP", PORT, "192.168.77.99", 41000, "other box")]
    # the LAN host cannot delete it (secure mode)...
    assert delete(lab, "udp", PORT).startswith("ERR")
    assert len(lab.router_mappings()) == 1
    # ...its owner can
    lab.delete_foreign_mapping("udp", PORT)
    assert lab.router_mappings() == []


def test_add_foreign_mapping_without_secure_mode(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(secure_mode=False)
    lab.add_foreign_mapping("tcp", PORT, "192.168.77.50", desc="other box")
    assert lab.router_mappings() == [("TCP", PORT, "192.168.77.50", PORT, "other box")]


# -- (e) router restart ------------------------------------------------------------------------


def test_restart_router_flushes_mappings(lab: Lab) -> None:
    assert add(lab, "udp", PORT) == "OK True"
    assert lab.probe("udp", PORT)
    old_pid = lab.router_pid()
    lab.restart_router()
    assert lab.router_pid() != old_pid
    assert lab.router_mappings() == []
    assert lab.nft_mappings() == []
    assert not lab.probe("udp", PORT)
    # and the new instance works
    assert add(lab, "udp", PORT) == "OK True"
    assert lab.probe("udp", PORT)


def test_restart_router_without_flush_keeps_mappings(lab: Lab) -> None:
    out = upnp(
        lab, f"attempt(u.addportmapping, {PORT}, 'UDP', {lab.lan_ip!r}, {PORT}, 'k', '', 600)"
    )
    assert out.strip() == "OK True"
    lab.restart_router(flush=False)
    [entry] = lab.router_mapping_entries()
    assert entry.as_tuple() == ("UDP", PORT, lab.lan_ip, PORT, "k")
    assert 0 < entry.lease <= 600  # the lease file kept it
    assert lab.probe("udp", PORT)


# -- NAT-PMP / PCP only ------------------------------------------------------------------------

NATPMP_MAP = """
import socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.connect(({gw!r}, 5351))
s.send(struct.pack("!BBHHHI", 0, 1, 0, {port}, {port}, 3600))  # op 1: map UDP
ver, op, result, epoch, iport, eport, life = struct.unpack("!BBHIHHI", s.recv(16))
print(op, result, iport, eport)
"""


def test_natpmp_only_router(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(enable_upnp=False)
    upnpc = lab.run(lab.lan, ["upnpc", "-u", lab.igd_url, "-l"])
    assert "Connection refused" in upnpc.stderr  # no HTTP/SOAP server at all
    assert not lab.probe("udp", PORT)
    code = NATPMP_MAP.format(gw=lab.router_lan_ip, port=PORT)
    out = lab.run(lab.lan, [sys.executable, "-c", code], check=True).stdout
    assert out.split() == ["129", "0", str(PORT), str(PORT)]
    assert lab.nft_mappings() == [("UDP", PORT, lab.lan_ip, PORT)]
    assert lab.probe("udp", PORT)


# -- the rest of the router -----------------------------------------------------------------


def test_lan_to_wan_is_masqueraded(lab: Lab) -> None:
    code = (
        "import socket;s=socket.socket(2,2);s.bind(('0.0.0.0',9000));s.settimeout(3);"
        "print(s.recvfrom(64)[1][0])"
    )
    wan = lab.popen(lab.wan, [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    send = "import socket;s=socket.socket(2,2);s.sendto(b'x',('11.22.33.2',9000))"
    deadline = time.monotonic() + 3
    while wan.poll() is None and time.monotonic() < deadline:
        lab.run(lab.lan, [sys.executable, "-c", send])
        time.sleep(0.05)
    out, _ = wan.communicate(timeout=5)
    assert out.strip() == lab.router_wan_ip


def _first_conntrack_event(lab: Lab, tries: int = 20) -> str:
    ev = lab.popen(
        lab.lan,
        ["conntrack", "-E", "-e", "NEW", "-p", "udp"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert ev.stdout is not None
    send = "import socket;s=socket.socket(2,2);s.sendto(b'x',('11.22.33.2',9000))"
    line = ""
    with selectors.DefaultSelector() as sel:
        sel.register(ev.stdout, selectors.EVENT_READ)
        for _ in range(tries):
            lab.run(lab.lan, [sys.executable, "-c", send])
            if sel.select(0.05):
                line = ev.stdout.readline()
                break
    ev.terminate()
    ev.communicate(timeout=5)
    return line


def test_conntrack_new_events_fire_in_the_lan_host(lab: Lab) -> None:
    line = _first_conntrack_event(lab)
    assert "[NEW] udp" in line
    assert f"src={lab.lan_ip} dst={lab.wan_ip}" in line


def test_lan_conntrack_can_be_left_off(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(lan_conntrack=False)
    assert _first_conntrack_event(lab, tries=5) == ""


# -- lifecycle --------------------------------------------------------------------------------


def test_close_removes_everything() -> None:
    lab = Lab(lan_hosts=2).start()
    names = [lab.router, lab.wan, *lab.lan_hosts, lab.add_lan_host("192.168.77.60")]
    pid = lab.router_pid()
    workdir = lab.workdir
    assert pid is not None
    assert set(names) <= set(os.listdir("/run/netns"))
    lab.close()
    lab.close()  # idempotent
    assert not set(names) & set(os.listdir("/run/netns"))
    stat = Path(f"/proc/{pid}/stat")
    # gone, or a zombie waiting for init to reap it (miniupnpd daemonized away from us)
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    assert not workdir.exists()


def test_cleanup_stale_removes_namespaces_of_dead_runs() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"igdt-{dead.pid}-0-rtr"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert name in cleanup_stale()
        assert name not in os.listdir("/run/netns")
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
