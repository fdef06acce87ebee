"""`igdtrigger serve` with `[front] enabled`: an unmodified UPnP client (Debian's upnpc) maps
through it, /readyz waits for the front, status lists the client mapping, SIGTERM removes it
(issue 14)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.skipif(shutil.which("upnpc") is None, reason="Debian's miniupnpc is not installed")
def test_serve_with_front_maps_for_upnpc_and_sigterm_removes_it(tmp_path: Path) -> None:
    api, http = free_port(), free_port()
    config = tmp_path / "config.toml"
    config.write_text(f"""
[detect]
methods = []

[front]
enabled = true
interfaces = ["lo"]
http_port = {http}
allow = ["allow 1024-65535 127.0.0.0/8 1024-65535"]
""")
    ready = tmp_path / "ready"
    env = {**os.environ, "IGDTRIGGER_STATE_DIR": str(tmp_path / "state"),
           "PYTHONPATH": str(ROOT)}
    env.pop("JOURNAL_STREAM", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "igdtrigger", "serve", "--config", str(config), "--simulate",
         "--listen", f"127.0.0.1:{api}", "--ready-file", str(ready)], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        with urllib.request.urlopen(f"http://127.0.0.1:{api}/healthz", timeout=10) as resp:
            assert json.load(resp)["front_serving"] is True
        url = f"http://127.0.0.1:{http}/rootDesc.xml"
        add = subprocess.run(["upnpc", "-u", url, "-e", "game", "-a", "127.0.0.1", "40000",
                              "40000", "UDP"], capture_output=True, text=True, timeout=60)
        assert "is redirected to internal 127.0.0.1:40000" in add.stdout, add.stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{api}/api/v1/status",
                                    timeout=10) as resp:
            status = json.load(resp)
        (m,) = status["front"]["mappings"]
        assert (m["external_port"], m["internal_client"], m["description"]) == (
            40000, "127.0.0.1", "game")
        (act,) = status["activations"]
        assert act["source"] == "upnp"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "(1 mapping(s) removed)" in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
