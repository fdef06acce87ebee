"""Processes the benchmark runs inside the lab's namespaces, driven by JSON lines on stdin.

All namespaces share CLOCK_MONOTONIC, so a time taken on the LAN host and one taken on the WAN
host are comparable; the orchestrator only relays commands and never times anything itself.

    python -m bench.agents blaster   (WAN host) sends UDP probes to the router's external address,
                                     each from a fresh source port, while told to
    python -m bench.agents driver    (LAN host) fires a trigger (conntrack path), an API call, the
                                     wrapper, `upnpc -a` or a bare miniupnpc AddPortMapping and
                                     stamps when the first probe arrives through the new mapping;
                                     runs the range, NAT-PMP and re-add loops of cases 2 and 3
    python -m bench.agents loader    (LAN host) sends new non-matching UDP flows at a fixed rate
                                     to the WAN host (lab-internal address), for a bounded time

Every loop here is bounded in time; every address is the lab's (given by the orchestrator).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any

from igdtrigger.cli.entry import request_bytes

PROBE_INTERVAL = 0.0001  # seconds between probe packets while blasting
MAX_BLAST = 10.0  # a blast ends by itself after this long even if nobody says stop
MAX_LOAD = 30.0  # the loader never runs longer than this


def reply(msg: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


# --- WAN host ------------------------------------------------------------------------------------


def blaster() -> None:
    stop = threading.Event()
    worker: threading.Thread | None = None

    def blast(dst: tuple[str, int], interval: float) -> None:
        deadline = time.monotonic() + MAX_BLAST  # bounded even if the orchestrator dies
        while not stop.is_set() and time.monotonic() < deadline:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"probe", dst)  # a fresh source port: a new flow on the router
            time.sleep(interval)

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "go":
            stop.clear()
            worker = threading.Thread(
                target=blast, args=((cmd["host"], int(cmd["port"])),
                                    float(cmd.get("interval", PROBE_INTERVAL))), daemon=True)
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


# --- LAN host ------------------------------------------------------------------------------------


def _first_packet(s: socket.socket, timeout: float) -> float | None:
    r, _, _ = select.select([s], [], [], timeout)
    if not r:
        return None
    t1 = time.monotonic()
    s.recv(64)
    return t1


def _listen(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    return s


def _ports(spec: list[list[Any]]) -> list[tuple[str, int]]:
    """[["TCP", 42000, 42099], ["UDP", 42000, 42099]] -> [("TCP", 42000), ...]"""
    return [(str(p).upper(), port) for p, a, b in spec for port in range(int(a), int(b) + 1)]


class Driver:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.wan_ip = str(cfg["wan_ip"])
        self.igd_url = str(cfg["igd_url"])
        self.lan_ip = str(cfg["lan_ip"])
        self.router_ip = str(cfg["router_ip"])
        self.root = str(cfg["root"])
        self.python = str(cfg["python"])
        self.env = {**os.environ, "PYTHONPATH": self.root}  # PYTHONPYCACHEPREFIX: inherited
        self._upnp: Any = None
        self.child: subprocess.Popen[bytes] | None = None

    @property
    def upnp(self) -> Any:
        if self._upnp is None:
            import miniupnpc

            self._upnp = miniupnpc.UPnP()
            self._upnp.selectigd(self.igd_url)
        return self._upnp

    # -- HTTP API ---------------------------------------------------------------------------------
    @classmethod
    def api(cls, port: int, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One API request, answered (``api_send`` then ``api_answer``)."""
        return cls.api_answer(cls.api_send(port, method, path, body), method, path)

    @staticmethod
    def api_send(port: int, method: str, path: str,
                 body: dict[str, Any] | None = None) -> socket.socket:
        """Connect and send one request as our own client (``igdtrigger.cli.client``) writes
        it: request line, headers and body in one ``sendall`` (one TCP segment for a small
        body, as curl and browsers send it too; ``http.client`` would send the body as a second
        segment). The connected socket, for ``api_answer``."""
        headers = {"Accept": "application/json", "Connection": "close"}
        payload = None if body is None else json.dumps(body).encode()
        if payload is not None:
            headers["Content-Type"] = "application/json"
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        try:
            sock.sendall(request_bytes(method, path, f"127.0.0.1:{port}", headers, payload))
        except BaseException:
            sock.close()
            raise
        return sock

    @staticmethod
    def api_answer(sock: socket.socket, method: str, path: str) -> Any:
        """The JSON answer to the request ``api_send`` sent on ``sock`` (closed after);
        RuntimeError for an HTTP error."""
        with sock:
            resp = http.client.HTTPResponse(sock, method=method)
            try:
                resp.begin()
                data = resp.read()
            finally:
                resp.close()
        out = json.loads(data) if data else None
        if resp.status >= 400:
            raise RuntimeError(f"{method} {path}: HTTP {resp.status} {out}")
        return out

    def api_wait_empty(self, port: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.api(port, "GET", "/api/v1/mappings")["mappings"]:
            if time.monotonic() > deadline:
                raise RuntimeError("the service still holds mappings")
            time.sleep(0.005)

    def router_wait_free(self, port: int, proto: str = "UDP", timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                entry = self.upnp.getspecificportmapping(port, proto)
            except Exception:
                return  # NoSuchEntryInArray
            if entry is None:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the router still maps {proto}/{port}: {entry}")
            time.sleep(0.005)

    # -- case 1: trigger to open port ------------------------------------------------------------
    def trial(self, cmd: dict[str, Any]) -> dict[str, Any]:
        mode, port = str(cmd["mode"]), int(cmd["port"])
        lst = _listen(port)
        call = 0.0
        try:
            if mode == "conntrack":
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    t0 = time.monotonic()
                    s.sendto(b"trigger", (self.wan_ip, int(cmd.get("trigger_port", 27015))))
            elif mode == "api":
                # the call answers once the router did; the packet may come through before:
                # send the request, wait for the packet, then read the answer (a client's own
                # steps; no thread start inside the measured time)
                t0 = time.monotonic()
                post = self.api_send(int(cmd["api_port"]), "POST", "/api/v1/activations",
                                     {"rule": cmd.get("rule", "bench"), "ttl": 600})
            elif mode == "floor":
                u = self.upnp
                t0 = time.monotonic()
                u.addportmapping(port, "UDP", self.lan_ip, port, "bench floor", "", 600)
                call = time.monotonic() - t0
            elif mode in ("wrapper", "wrapper_standalone"):
                argv = [self.python, "-m", "igdtrigger", "run", "--config", str(cmd["config"]),
                        "--rule", str(cmd.get("rule", "bench")), "--", "sleep", "60"]
                with open(str(cmd["stderr"]), "ab") as err:
                    t0 = time.monotonic()
                    self.child = subprocess.Popen(argv, env=self.env, cwd="/",
                                                  stdout=subprocess.DEVNULL, stderr=err)
            elif mode == "upnpc":
                argv = ["upnpc", "-e", "bench upnpc", "-a", self.lan_ip, str(port), str(port),
                        "UDP", "600"]
                t0 = time.monotonic()
                self.child = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL)
            elif mode == "python":
                t0 = time.monotonic()
                subprocess.run([self.python, "-c", "pass"], env=self.env, check=True)
                return {"open": time.monotonic() - t0, "call": 0.0}
            else:
                raise ValueError(mode)
            t1 = _first_packet(lst, float(cmd.get("timeout", 5.0)))
            if mode == "api":
                self.api_answer(post, "POST", "/api/v1/activations")
                call = time.monotonic() - t0
        finally:
            lst.close()
        return {"open": None if t1 is None else t1 - t0, "call": call}

    def reset(self, cmd: dict[str, Any]) -> None:
        """Close what the trial opened and wait until nothing of it is left."""
        mode, port = str(cmd["mode"]), int(cmd["port"])
        if mode == "python":
            return
        if mode == "floor":
            self.upnp.deleteportmapping(port, "UDP")
            return
        if mode == "upnpc":
            assert self.child is not None
            self.child.wait(10)
            self.child = None
            with contextlib.suppress(Exception):
                self.upnp.deleteportmapping(port, "UDP")
            return
        if mode in ("wrapper", "wrapper_standalone"):
            assert self.child is not None
            self.child.send_signal(signal.SIGTERM)  # forwarded to the game; ports close
            self.child.wait(15)
            self.child = None
            if mode == "wrapper_standalone":
                try:
                    self.router_wait_free(port)
                except RuntimeError as exc:
                    acts = self.api(int(cmd["api_port"]), "GET", "/api/v1/activations")
                    raise RuntimeError(f"{exc}; service: {acts}") from None
                return
        if mode == "conntrack":
            # the trigger's flow lives on in conntrack, and the service follows live matching
            # flows: forget it first, or the next look re-activates the rule mid-way through
            # another trial (the standalone wrapper's then finds the port held)
            subprocess.run(["conntrack", "-D", "-p", "udp", "--orig-port-dst",
                            str(cmd.get("trigger_port", 27015))],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        api_port = int(cmd["api_port"])
        for act in self.api(api_port, "GET", "/api/v1/activations")["activations"]:
            self.api(api_port, "DELETE", f"/api/v1/activations/{act['id']}")
        self.api_wait_empty(api_port)

    def importtime(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """What `igdtrigger run` imports (python -X importtime), and in how long."""
        argv = [self.python, "-X", "importtime", "-m", "igdtrigger", "run", "--config",
                str(cmd["config"]), "--rule", str(cmd.get("rule", "bench")), "--", "true"]
        p = subprocess.run(argv, env=self.env, cwd="/", capture_output=True, text=True,
                           timeout=60)
        mods: dict[str, int] = {}
        for line in p.stderr.splitlines():
            parts = line[len("import time:"):].split("|")
            if not line.startswith("import time:") or len(parts) != 3:
                continue
            self_us, name = parts[0].strip(), parts[2].strip()
            if self_us.isdigit():
                mods[name] = int(self_us)
        heavy = sorted({m.split(".")[0] for m in mods} & {
            "aiohttp", "zeroconf", "sqlite3", "miniupnpc", "multidict", "yarl", "ssl",
            "asyncio", "email", "concurrent", "xml", "ifaddr", "psutil"})
        igd = sorted(m for m in mods if m.startswith("igdtrigger"))
        return {"modules": len(mods), "self_ms_total": sum(mods.values()) / 1e3,
                "heavy": heavy, "igdtrigger_modules": igd,
                "top": sorted(((v / 1e3, k) for k, v in mods.items()), reverse=True)[:12]}

    # -- case 2: a range of ports ------------------------------------------------------------------
    def range_floor(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """The bare miniupnpc loop: every add, then every delete (optionally a Get before each
        add, as a careful client does)."""
        u = self.upnp
        ports = _ports(cmd["ports"])
        checked = bool(cmd.get("checked"))
        lease = int(cmd.get("lease", 3600))
        t0 = time.monotonic()
        for proto, port in ports:
            if checked:
                try:  # noqa: SIM105 - the floor loop stays as bare as it gets
                    u.getspecificportmapping(port, proto)
                except Exception:
                    pass
            u.addportmapping(port, proto, self.lan_ip, port, "bench range floor", "", lease)
        t1 = time.monotonic()
        for proto, port in ports:
            u.deleteportmapping(port, proto)
        t2 = time.monotonic()
        return {"open": t1 - t0, "close": t2 - t1}

    @staticmethod
    def _pinhole_call(cmd: dict[str, Any], action: str, args: str) -> bytes:
        """One prebuilt WANIPv6FirewallControl request on its own TCP connection (as miniupnpc
        does), from this host's IPv6 address to the router's."""
        router, src, path = str(cmd["router"]), str(cmd["source"]), str(cmd["path"])
        http_port = int(cmd["http_port"])
        svc = "urn:schemas-upnp-org:service:WANIPv6FirewallControl:1"
        body = (f'<?xml version="1.0"?>\r\n<s:Envelope xmlns:s="http://schemas.xmlsoap.org/'
                f'soap/envelope/" s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/">'
                f'<s:Body><u:{action} xmlns:u="{svc}">{args}</u:{action}></s:Body>'
                "</s:Envelope>\r\n").encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: [{router}]:{http_port}\r\n"
                f'Content-Type: text/xml; charset="utf-8"\r\nSOAPAction: "{svc}#{action}"'
                f"\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        with socket.create_connection((router, http_port), timeout=5,
                                      source_address=(src, 0)) as s:
            s.sendall(head + body)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        if b" 200 " not in data.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"{action}: {data[:300]!r}")
        return data

    def _pinholes_add(self, cmd: dict[str, Any]) -> list[str]:
        numbers = {"TCP": 6, "UDP": 17}
        uids = []
        for proto, port in _ports(cmd["ports"]):
            out = self._pinhole_call(
                cmd, "AddPinhole",
                f"<RemoteHost></RemoteHost><RemotePort>0</RemotePort><InternalClient>"
                f"{cmd['source']}</InternalClient><InternalPort>{port}</InternalPort>"
                f"<Protocol>{numbers[proto]}</Protocol><LeaseTime>3600</LeaseTime>")
            uids.append(out.split(b"<UniqueID>")[1].split(b"<")[0].decode())
        return uids

    def _pinholes_delete(self, cmd: dict[str, Any], uids: list[str]) -> None:
        for uid in uids:
            self._pinhole_call(cmd, "DeletePinhole", f"<UniqueID>{uid}</UniqueID>")

    def pinhole_floor(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """The bare IPv6 pinhole loop: every AddPinhole, then every DeletePinhole. With
        ``ipv4``, the bare miniupnpc loop's mappings are added first and deleted first, in the
        order the service does it (so the router's tables are as full as they are for it)."""
        ports = _ports(cmd["ports"])
        u = self.upnp
        ipv4 = bool(cmd.get("ipv4"))
        t0 = time.monotonic()
        if ipv4:
            for proto, port in ports:
                u.addportmapping(port, proto, self.lan_ip, port, "bench ipv6 floor", "", 3600)
        uids = self._pinholes_add(cmd)
        t1 = time.monotonic()
        if ipv4:
            for proto, port in ports:
                u.deleteportmapping(port, proto)
        self._pinholes_delete(cmd, uids)
        t2 = time.monotonic()
        return {"open": t1 - t0, "close": t2 - t1}

    def range_api(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Through the service: POST an activation of the range rule, wait until every port is
        active; DELETE it, wait until the service holds nothing."""
        port = int(cmd["api_port"])
        n = int(cmd["count"])
        t0 = time.monotonic()
        act = self.api(port, "POST", "/api/v1/activations", {"rule": cmd["rule"], "ttl": 600})
        deadline = t0 + 60
        while act.get("state") != "open":
            if time.monotonic() > deadline:
                raise RuntimeError(f"range not open after 60 s: {act.get('state')}")
            time.sleep(0.002)
            act = self.api(port, "GET", f"/api/v1/activations/{act['id']}")
        holes = 0
        while cmd.get("pinholes") and holes < n:  # IPv6 follows IPv4 in its own task
            if time.monotonic() > deadline:
                raise RuntimeError(f"{holes} of {n} pinholes active after 60 s")
            holes = len([h for h in self.api(port, "GET", "/api/v1/status")["pinholes"]
                         ["entries"] if h["state"] == "active"])
            if holes < n:
                time.sleep(0.002)
        t1 = time.monotonic()
        active = sum(1 for p in act["ports"] if p.get("state") == "active")
        self.api(port, "DELETE", f"/api/v1/activations/{act['id']}")
        self.api_wait_empty(port, 60)
        if cmd.get("pinholes"):
            deadline = time.monotonic() + 60
            while self.api(port, "GET", "/api/v1/status")["pinholes"]["entries"]:
                if time.monotonic() > deadline:
                    raise RuntimeError("the service still holds pinholes")
                time.sleep(0.005)
        t2 = time.monotonic()
        if active != n:
            raise RuntimeError(f"{active} of {n} ports active")
        if cmd.get("pinholes") and holes != n:
            raise RuntimeError(f"{holes} of {n} pinholes active")
        return {"open": t1 - t0, "close": t2 - t1}

    def range_api_open(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """POST an activation and wait until every port is active (not timed)."""
        port = int(cmd["api_port"])
        act = self.api(port, "POST", "/api/v1/activations", {"rule": cmd["rule"], "ttl": 3600})
        deadline = time.monotonic() + 60
        while act.get("state") != "open":
            if time.monotonic() > deadline:
                raise RuntimeError(f"not open after 60 s: {act.get('state')}")
            time.sleep(0.01)
            act = self.api(port, "GET", f"/api/v1/activations/{act['id']}")
        return {"id": act["id"]}

    def pmp(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """NAT-PMP: a bare sequential request/reply loop, all requests in flight at once, and
        igdtrigger's NatPmpGateway one at a time and pipelined (its max_in_flight)."""
        return asyncio.run(self._pmp(str(cmd["mode"]), _ports(cmd["ports"]),
                                     int(cmd.get("lease", 3600))))

    async def _pmp(self, mode: str, ports: list[tuple[str, int]], lease: int) -> dict[str, Any]:
        if mode in ("raw_seq", "raw_all"):
            return self._pmp_raw(ports, lease, pipelined=mode == "raw_all")
        sys.path.insert(0, self.root)
        from igdtrigger.core.model import MappingSpec, Proto
        from igdtrigger.gateway.natpmp.backend import NatPmpGateway

        gw = NatPmpGateway(self.router_ip)
        try:
            info = await gw.connect()
            specs = [MappingSpec(Proto(p), port, info.local_address, port, "bench pmp")
                     for p, port in ports]
            t0 = time.monotonic()
            if mode == "gw_seq":
                for spec in specs:
                    await gw.add(spec, lease)
                t1 = time.monotonic()
                for spec in specs:
                    await gw.delete(spec.proto, spec.external_port)
            else:
                await asyncio.gather(*(gw.add(spec, lease) for spec in specs))
                t1 = time.monotonic()
                await asyncio.gather(*(gw.delete(s.proto, s.external_port) for s in specs))
            t2 = time.monotonic()
        finally:
            await gw.close()
        return {"open": t1 - t0, "close": t2 - t1}

    def _pmp_raw(self, ports: list[tuple[str, int]], lease: int,
                 pipelined: bool) -> dict[str, Any]:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect((self.router_ip, 5351))
        s.settimeout(0.25)

        def req(proto: str, port: int, life: int) -> bytes:
            op = 1 if proto == "UDP" else 2
            return struct.pack("!BBHHHI", 0, op, 0, port, port if life else 0, life)

        def key(data: bytes) -> tuple[int, int] | None:
            if len(data) < 16:
                return None
            _v, op, result, _epoch, iport, _eport, _life = struct.unpack("!BBHIHHI", data[:16])
            if result != 0:
                raise RuntimeError(f"NAT-PMP result {result}")
            return (op - 128, iport)

        def run(life: int) -> float:
            want = {(1 if p == "UDP" else 2, port): req(p, port, life) for p, port in ports}
            t0 = time.monotonic()
            deadline = t0 + 10
            if pipelined:
                while want and time.monotonic() < deadline:
                    for payload in want.values():
                        s.send(payload)
                    try:
                        while want:
                            k = key(s.recv(64))
                            if k is not None:
                                want.pop(k, None)
                    except TimeoutError:
                        pass  # resend what is missing
            else:
                for k, payload in list(want.items()):
                    while time.monotonic() < deadline:
                        s.send(payload)
                        try:
                            if key(s.recv(64)) == k:
                                break
                        except TimeoutError:
                            continue
                    want.pop(k)
            if want:
                raise RuntimeError(f"{len(want)} NAT-PMP requests unanswered")
            return time.monotonic() - t0

        try:
            return {"open": run(lease), "close": run(0)}
        finally:
            s.close()

    # -- case 3: router restart ------------------------------------------------------------------
    def add_many(self, cmd: dict[str, Any]) -> dict[str, Any]:
        u = self.upnp
        if cmd.get("reselect"):
            u.selectigd(self.igd_url)
        t0 = time.monotonic()
        for proto, port in _ports(cmd["ports"]):
            u.addportmapping(port, proto, self.lan_ip, port, "bench restart floor", "", 3600)
        return {"t0": t0, "t1": time.monotonic()}

    def delete_many(self, cmd: dict[str, Any]) -> dict[str, Any]:
        for proto, port in _ports(cmd["ports"]):
            with contextlib.suppress(Exception):
                self.upnp.deleteportmapping(port, proto)
        return {}


def driver() -> None:
    d: Driver | None = None
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "quit":
                if d is not None and d.child is not None and d.child.poll() is None:
                    d.child.kill()
                return
            if op == "init":
                d = Driver(cmd)
                reply({"ok": True})
                continue
            assert d is not None
            if op == "trial":
                reply({"ok": True, **d.trial(cmd)})
            elif op == "reset":
                d.reset(cmd)
                reply({"ok": True})
            elif op == "api":
                reply({"ok": True, "data": d.api(int(cmd["port"]), cmd["method"], cmd["path"],
                                                 cmd.get("body"))})
            elif op == "api_wait_empty":
                d.api_wait_empty(int(cmd["port"]), float(cmd.get("timeout", 30)))
                reply({"ok": True})
            elif op in ("importtime", "range_floor", "range_api", "range_api_open", "pmp",
                        "pinhole_floor",
                        "add_many", "delete_many"):
                reply({"ok": True, **getattr(d, op)(cmd)})
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as exc:
            reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


class Loader:
    """New UDP flows at a fixed rate to the WAN host, to ports no rule triggers on."""

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.result: dict[str, Any] = {}

    def start(self, cmd: dict[str, Any]) -> float:
        dst = str(cmd["dst"])
        rate = float(cmd["rate"])
        duration = min(float(cmd["duration"]), MAX_LOAD)
        first, last = int(cmd["first_port"]), int(cmd["last_port"])
        ports = list(range(first, last + 1))
        nsock = int(cmd.get("sockets", 8))
        t_start = time.monotonic()

        def run() -> None:
            c0 = time.thread_time()
            # fresh sockets: new source ports, so every (sport, dport) pair is a new flow
            socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(nsock)]
            sent = 0
            capacity = nsock * len(ports)
            try:
                while True:
                    el = time.monotonic() - t_start
                    if el >= duration or sent >= capacity:
                        break
                    due = min(int(el * rate), capacity)
                    while sent < due:
                        s = socks[(sent // len(ports)) % nsock]
                        s.sendto(b"x", (dst, ports[sent % len(ports)]))
                        sent += 1
                    time.sleep(0.002)
            finally:
                for s in socks:
                    s.close()
            el = time.monotonic() - t_start
            self.result = {"sent": sent, "seconds": el, "rate": sent / el if el else 0.0,
                           "t_start": t_start, "t_end": time.monotonic(),
                           "cpu_s": time.thread_time() - c0}

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        return t_start

    def wait(self) -> dict[str, Any]:
        if self.thread is not None:
            self.thread.join(MAX_LOAD + 5)
        return self.result


def loader() -> None:
    ld = Loader()
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "quit":
                return
            if cmd["op"] == "init":
                reply({"ok": True})
            elif cmd["op"] == "load":
                reply({"ok": True, "t_start": ld.start(cmd)})
            elif cmd["op"] == "wait":
                reply({"ok": True, **ld.wait()})
            else:
                raise ValueError(cmd["op"])
        except Exception as exc:
            reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    {"blaster": blaster, "driver": driver, "loader": loader}[sys.argv[1]]()
