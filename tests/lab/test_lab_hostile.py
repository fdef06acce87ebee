"""A hostile LAN host against the API of a service on the LAN (issue 13), with a real router.

The service runs on LAN host 1 (listening on the LAN, file-descriptor limit 1024 as on a
default desktop session), holds a mapping on miniupnpd, and LAN host 2 opens 1,100 connections
that send half a request line (re-opening each one that is closed) for 15 s. Host 1 keeps
asking /healthz over the LAN meanwhile: every answer must come, the mapping must stay, the
gateway must never be called down and the log must stay small.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fakes import wait_for
from tests.lab.netlab import Lab
from tests.lab.test_lab_service import ROOT, env, igdt_argv, ours

pytestmark = pytest.mark.lab

FLOOD_SECONDS = 15

FLOOD = textwrap.dedent("""
    import selectors, socket, sys, time
    target, count, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    sel = selectors.DefaultSelector()
    opened = refused = 0
    def connect():
        global opened
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex((target, 8731))
        sel.register(s, selectors.EVENT_WRITE)
        opened += 1
    for _ in range(count):
        connect()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for key, ev in sel.select(0.2):
            s = key.fileobj
            if ev & selectors.EVENT_WRITE:
                try:
                    s.send(b"GET /healthz HT")  # half a request line, never finished
                    sel.modify(s, selectors.EVENT_READ)
                    continue
                except OSError:
                    pass
            else:
                try:
                    if s.recv(4096):
                        continue
                except OSError:
                    pass
            refused += 1  # closed by the server: open another one
            sel.unregister(s)
            s.close()
            connect()
    print(opened, refused)
""")

HEALTH = textwrap.dedent("""
    import json, sys, time, urllib.request
    url, seconds = sys.argv[1], float(sys.argv[2])
    worst, n, failed = 0.0, 0, []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                json.loads(r.read())
        except Exception as exc:
            failed.append(repr(exc))
        took = time.monotonic() - t0
        worst, n = max(worst, took), n + 1
        time.sleep(0.25)
    print(json.dumps({"worst": worst, "requests": n, "failed": failed}))
""")


def _fd_limit_1024() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


def test_slow_connection_flood_from_another_lan_host_leaves_the_service_up(
        make_lab: Callable[..., Lab], tmp_path: Path) -> None:
    lab = make_lab(lan_hosts=2)
    state = tmp_path / "state"
    config = tmp_path / "config.toml"
    config.write_text(f"""
[gateway]
url = "{lab.igd_url}"
lease = "1h"
check_interval = "2s"

[api]
listen = "0.0.0.0:8731"
zeroconf = false

[detect]
methods = []

[service]
state_dir = "{state}"

[[rules]]
name = "game"
open = ["udp/40000"]
""")
    ready = tmp_path / "ready"
    log = tmp_path / "serve.log"
    with log.open("wb") as logf:
        proc = lab.popen(lab.lan, igdt_argv("serve", "--config", str(config), "--ready-file",
                                            str(ready)),
                         env=env(), stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT,
                         preexec_fn=_fd_limit_1024)
    try:
        wait_for(lambda: ready.exists() or proc.poll() is not None, 30, "serve to start")
        assert proc.poll() is None, log.read_text()
        act = lab.run(lab.lan, igdt_argv("activate", "game", "--for", "10m",
                                         "--server", "http://127.0.0.1:8731"),
                      env=env(), cwd=ROOT)
        assert act.returncode == 0, act.stdout + act.stderr
        wait_for(lambda: len(ours(lab)) == 1, 20, "the mapping on the router")

        flood = lab.popen(lab.lan_hosts[1], [sys.executable, "-c", FLOOD, lab.lan_ip, "1100",
                                             str(FLOOD_SECONDS)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(2)  # let the flood build up
        health = lab.run(lab.lan, [sys.executable, "-c", HEALTH,
                                   f"http://{lab.lan_ip}:8731/healthz",
                                   str(FLOOD_SECONDS - 4)], timeout=120)
        out, err = flood.communicate(timeout=120)
        assert flood.returncode == 0, err
        opened, refused = (int(x) for x in out.split())

        result = json.loads(health.stdout)
        print(f"flood: {opened} connections opened, {refused} closed by the service; "
              f"/healthz: {result['requests']} requests, worst {result['worst']:.3f}s")
        assert result["failed"] == [], result
        assert result["requests"] >= 5
        assert refused > 0  # the service turned most of the flood away

        status = json.loads(lab.run(lab.lan, igdt_argv(
            "status", "--json", "--server", "http://127.0.0.1:8731"), env=env(),
            cwd=ROOT).stdout)
        assert status["gateway"]["up"] is True
        assert len(ours(lab)) == 1  # the mapping stayed
        text = log.read_text(errors="replace")
        assert "lost" not in text and "gateway down" not in text.lower(), text[-3000:]
        assert len(text) < 100_000, f"{len(text)} bytes of log in {FLOOD_SECONDS}s"
    finally:
        proc.terminate()
        proc.wait(20)
