"""Processes the benchmark runs inside the lab's namespaces, driven by JSON lines on stdin.

All namespaces share CLOCK_MONOTONIC, so a time taken on the LAN host and one taken on the WAN
host are comparable; the orchestrator only relays commands and never times anything itself.

    python -m bench.agents blaster   (WAN host) sends UDP probes to the router's external address,
                                     each from a fresh source port, while told to
    python -m bench.agents driver    (LAN host) fires a trigger (conntrack path), an API call or a
                                     bare miniupnpc AddPortMapping, and stamps when the first probe
                                     arrives through the new mapping
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import sys
import threading
import time
from typing import Any

PROBE_INTERVAL = 0.0001  # seconds between probe packets while blasting


def reply(msg: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def blaster() -> None:
    target: tuple[str, int] | None = None
    stop = threading.Event()
    worker: threading.Thread | None = None

    def blast(dst: tuple[str, int]) -> None:
        deadline = time.monotonic() + 10.0  # bounded even if the orchestrator dies
        sent = 0
        while not stop.is_set() and time.monotonic() < deadline:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"probe", dst)  # a fresh source port: a new flow on the router
            sent += 1
            time.sleep(PROBE_INTERVAL)

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "go":
            target = (cmd["host"], int(cmd["port"]))
            stop.clear()
            worker = threading.Thread(target=blast, args=(target,), daemon=True)
            worker.start()
            reply({"ok": True})
        elif cmd["op"] == "stop":
            stop.set()
            if worker is not None:
                worker.join()
            reply({"ok": True})
        elif cmd["op"] == "quit":
            stop.set()
            return


class Driver:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.wan_ip = str(cfg["wan_ip"])
        self.igd_url = str(cfg["igd_url"])
        self.lan_ip = str(cfg["lan_ip"])
        self.api_port = int(cfg.get("api_port", 8731))
        self.upnp: Any = None

    def _listen(self, port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        return s

    @staticmethod
    def _first_packet(s: socket.socket, timeout: float) -> float | None:
        r, _, _ = select.select([s], [], [], timeout)
        if not r:
            return None
        t1 = time.monotonic()
        s.recv(64)
        return t1

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=10)
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers={"Content-Type": "application/json"})
        data = conn.getresponse().read()
        conn.close()
        return json.loads(data) if data else None

    def trial(self, mode: str, port: int, trigger_port: int) -> dict[str, Any]:
        lst = self._listen(port)
        try:
            call = 0.0
            if mode == "conntrack":
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    t0 = time.monotonic()
                    s.sendto(b"trigger", (self.wan_ip, trigger_port))
            elif mode == "api":
                t0 = time.monotonic()
                self.api("POST", "/api/v1/activations", {"rule": "bench", "ttl": 60})
                call = time.monotonic() - t0
            elif mode == "floor":
                if self.upnp is None:
                    import miniupnpc

                    self.upnp = miniupnpc.UPnP()
                    self.upnp.selectigd(self.igd_url)
                t0 = time.monotonic()
                self.upnp.addportmapping(port, "UDP", self.lan_ip, port, "bench floor", "", 600)
                call = time.monotonic() - t0
            else:
                raise ValueError(mode)
            t1 = self._first_packet(lst, 5.0)
        finally:
            lst.close()
        return {"open": None if t1 is None else t1 - t0, "call": call}

    def reset(self, mode: str, port: int) -> None:
        """Close what the trial opened and wait until the router holds none of it."""
        if mode == "floor":
            self.upnp.deleteportmapping(port, "UDP")
            return
        for act in self.api("GET", "/api/v1/activations")["activations"]:
            self.api("DELETE", f"/api/v1/activations/{act['id']}")
        deadline = time.monotonic() + 5
        while self.api("GET", "/api/v1/mappings")["mappings"] and time.monotonic() < deadline:
            time.sleep(0.005)


def driver() -> None:
    d: Driver | None = None
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "init":
                d = Driver(cmd)
                reply({"ok": True})
            elif cmd["op"] == "trial":
                assert d is not None
                reply({"ok": True, **d.trial(cmd["mode"], int(cmd["port"]),
                                            int(cmd.get("trigger_port", 27015)))})
            elif cmd["op"] == "reset":
                assert d is not None
                d.reset(cmd["mode"], int(cmd["port"]))
                reply({"ok": True})
            elif cmd["op"] == "quit":
                return
        except Exception as exc:
            reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    {"blaster": blaster, "driver": driver}[sys.argv[1]]()
