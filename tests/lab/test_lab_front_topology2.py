"""The IGD front's topology 2 in the lab (issue 14): igdtrigger on a LAN host, the upstream
mapping pointing at the client directly (here the host's own app, which a secure-mode router
accepts). "In use" is a flow to OR from the mapped internal port: an app that only sends out
from its mapped port (a game server, a torrent client talking first) keeps its lease-0 mapping
past ``idle_timeout``; one nobody uses is removed.

    WAN host 11.22.33.2 ── ISP router (miniupnpd, secure mode) ── LAN host 192.168.77.10
                           AddPortMapping(40007 → 192.168.77.10)   igdtrigger serve [front]
                                                                   + the app (upnpc, sender)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.lab.doublenat import ROOT, wait_until
from tests.lab.netlab import HOST_IF, Lab, LabError, lab_required

pytestmark = pytest.mark.lab

USED, IDLE = 40007, 40006
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "IGDTRIGGER_TOKEN": ""}

SENDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[2])))
while True:
    s.sendto(b"x", (sys.argv[1], 9))  # unconnected, outbound only: nothing ever comes back
    time.sleep(0.5)
"""


def config(lab: Lab, state: Path) -> str:
    return f"""
[gateway]
url = "{lab.igd_url}"
lease = "1h"

[api]
listen = "127.0.0.1:8731"

[service]
state_dir = "{state}"

[front]
enabled = true
interfaces = ["{HOST_IF}"]
idle_timeout = "6s"
"""


@pytest.fixture(params=["ct", "none"])
def lab(request: pytest.FixtureRequest, make_lab: Callable[..., Lab]) -> Lab:
    """The LAN host with a stateful firewall (the kernel tracks), or a plain desktop with no
    rule at all (the kernel tracks nothing until igdtrigger's own table asks it to)."""
    return make_lab(lan_firewall=request.param)


@pytest.fixture
def serve(lab: Lab, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    if shutil.which("upnpc") is None:
        why = "Debian package missing: miniupnpc (upnpc)"
        if lab_required():
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    cfg = tmp_path / "front.toml"
    cfg.write_text(config(lab, tmp_path / "state"))
    ready, log = tmp_path / "ready", tmp_path / "serve.log"
    with log.open("wb") as logf:
        proc = lab.popen(lab.lan, [sys.executable, "-m", "igdtrigger", "serve", "--config",
                                   str(cfg), "--ready-file", str(ready)],
                         env=ENV,
                         stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_until(lambda: ready.exists() or proc.poll() is not None, 30,
                   "igdtrigger serve to start", lambda: log.read_text(errors="replace"))
        if proc.poll() is not None:
            raise LabError(f"igdtrigger serve exited: {log.read_text(errors='replace')[-3000:]}")
        yield proc, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def status(lab: Lab) -> dict[str, object]:
    p = lab.run(lab.lan, [sys.executable, "-m", "igdtrigger", "status", "--json", "--server",
                          "http://127.0.0.1:8731"],
                env=ENV, cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    data: dict[str, object] = json.loads(p.stdout)
    return data


def test_an_app_sending_only_from_its_mapped_port_keeps_its_lease_0_mapping(
        lab: Lab, serve: tuple[subprocess.Popen[bytes], Path]) -> None:
    _proc, log = serve
    front = status(lab)["front"]
    assert isinstance(front, dict)
    assert front["topology"]["kind"] == "host"  # no forwarding here: topology 2
    (url,) = [u for u in front["upnp"] if lab.lan_ip in u]
    for port in (IDLE, USED):  # lease 0: "permanent", kept only while in use
        p = lab.run(lab.lan, ["upnpc", "-u", url, "-a", lab.lan_ip, str(port), str(port),
                              "UDP", "0"], timeout=60)
        assert p.returncode == 0 and "is redirected to internal" in p.stdout, p.stdout
    # the upstream mapping points at the client directly
    assert {("UDP", IDLE, lab.lan_ip, IDLE), ("UDP", USED, lab.lan_ip, USED)} <= set(
        lab.nft_mappings())
    sender = lab.popen(lab.lan, [sys.executable, "-c", SENDER, lab.wan_ip, str(USED)])

    def ports() -> set[int]:
        return {eport for _p, eport, _c, _i in lab.nft_mappings()}

    def detail() -> str:
        return f"{lab.nft_mappings()} {log.read_text(errors='replace')[-3000:]}"

    try:
        wait_until(lambda: IDLE not in ports(), 40, "the unused mapping to be removed", detail,
                   step=0.5)
        assert USED in ports(), detail()
        for _ in range(16):  # 8 s more: well past idle_timeout (6 s), still in use
            assert USED in ports(), detail()
            time.sleep(0.5)
    finally:
        sender.kill()
        sender.wait(10)
    # the app stopped sending: no longer in use, removed after idle_timeout
    wait_until(lambda: USED not in ports(), 40, "the mapping to go once its app stopped",
               detail, step=0.5)
