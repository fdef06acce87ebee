"""Probe agent for the router lab (stdlib only; runs inside a namespace).

Started by :mod:`tests.lab.netlab` as ``ip netns exec NS python probe_agent.py``. It reads one JSON
request per line on stdin and writes one JSON message per line on stdout:

* replies carry the request's ``"id"``;
* unsolicited events carry ``"ev"`` (``hello``, ``recv``, ``send_result``).

Operations:

``listen {proto, port}`` / ``unlisten {proto, port}``
    Bind a UDP socket / TCP listener on 0.0.0.0:port. Every datagram or accepted connection is
    reported as ``{"ev": "recv", "proto", "port", "src", "sport"}``.
``send {proto, dst, port, wait}``
    Send one UDP datagram / open one TCP connection from a FRESH source port (a counter, never
    reused within the agent's life, so the router's conntrack cannot replay an older NAT
    decision). Replies at once with ``{"sport": n}``; later emits ``send_result`` with ``result``
    one of ``refused`` (ICMP port unreachable / RST: certainly not delivered), ``connected``
    (TCP handshake completed), ``timeout`` (nothing came back within ``wait`` s), ``error``.
``http {host, port, path, timeout}``
    Minimal HTTP/1.0 GET; replies ``{"status": int | null, "error": str}``.
``natpmp {gateway, timeout}``
    NAT-PMP public address request; replies ``{"result": int | null, "external_ip": str}``.
``upnp_list {url}``
    Lists the IGD's port mappings with the miniupnpc module (imported lazily).
``quit``

The agent exits on stdin EOF (its parent went away), on ``quit``, or after ``--max-lifetime``
seconds, whichever comes first, so a crashed test run cannot leave it behind for long.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import random
import selectors
import socket
import struct
import sys
import time
from typing import Any

Msg = dict[str, Any]


def _emit(msg: Msg) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


class _Send:
    def __init__(self, ref: int, proto: str, sock: socket.socket, deadline: float) -> None:
        self.ref = ref
        self.proto = proto
        self.sock = sock
        self.deadline = deadline


class Agent:
    def __init__(self, max_lifetime: float) -> None:
        self.sel = selectors.DefaultSelector()
        self.listeners: dict[tuple[str, int], socket.socket] = {}
        self.sends: dict[int, _Send] = {}
        self.end = time.monotonic() + max_lifetime
        self.next_sport = random.randrange(20000, 50000)
        self.inbuf = b""
        self.running = True
        os.set_blocking(sys.stdin.fileno(), False)
        self.sel.register(sys.stdin.fileno(), selectors.EVENT_READ, ("stdin", None))

    # -- listeners ---------------------------------------------------------------------------
    def listen(self, proto: str, port: int) -> Msg:
        key = (proto, port)
        if key in self.listeners:
            return {"ok": True}
        if proto == "udp":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("0.0.0.0", port))
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", port))
            s.listen(64)
        s.setblocking(False)
        self.listeners[key] = s
        self.sel.register(s, selectors.EVENT_READ, ("listener", key))
        return {"ok": True}

    def unlisten(self, proto: str, port: int) -> Msg:
        s = self.listeners.pop((proto, port), None)
        if s is not None:
            self.sel.unregister(s)
            s.close()
        return {"ok": True}

    def on_listener(self, key: tuple[str, int]) -> None:
        proto, port = key
        s = self.listeners[key]
        while True:
            try:
                if proto == "udp":
                    _data, addr = s.recvfrom(65535)
                else:
                    conn, addr = s.accept()
                    conn.close()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # e.g. a pending ICMP error on the UDP socket: not a delivery
                continue
            _emit({"ev": "recv", "proto": proto, "port": port, "src": addr[0], "sport": addr[1]})

    # -- sender ------------------------------------------------------------------------------
    def _fresh_socket(self, proto: str) -> tuple[socket.socket, int]:
        kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
        for _ in range(1000):
            sport = self.next_sport
            self.next_sport = 20000 if sport >= 59999 else sport + 1
            s = socket.socket(socket.AF_INET, kind)
            try:
                s.bind(("0.0.0.0", sport))
            except OSError as e:
                s.close()
                if e.errno == errno.EADDRINUSE:
                    continue
                raise
            s.setblocking(False)
            return s, sport
        raise OSError(errno.EADDRINUSE, "no free source port")

    def send(self, ref: int, proto: str, dst: str, port: int, wait: float) -> Msg:
        s, sport = self._fresh_socket(proto)
        if proto == "udp":
            s.connect((dst, port))
            s.send(b"igdt-probe %d" % sport)
            events = selectors.EVENT_READ
        else:
            rc = s.connect_ex((dst, port))
            if rc not in (0, errno.EINPROGRESS):
                s.close()
                _emit({"ev": "send_result", "ref": ref, "result": "refused", "errno": rc})
                return {"sport": sport}
            events = selectors.EVENT_WRITE
        self.sends[ref] = _Send(ref, proto, s, time.monotonic() + wait)
        self.sel.register(s, events, ("send", ref))
        return {"sport": sport}

    def _finish(self, ref: int, result: str, **extra: Any) -> None:
        st = self.sends.pop(ref, None)
        if st is None:
            return
        self.sel.unregister(st.sock)
        st.sock.close()
        _emit({"ev": "send_result", "ref": ref, "result": result, **extra})

    def on_send(self, ref: int) -> None:
        st = self.sends.get(ref)
        if st is None:
            return
        if st.proto == "udp":
            try:
                st.sock.recv(2048)
            except ConnectionRefusedError:
                self._finish(ref, "refused")
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:
                self._finish(ref, "error", errno=e.errno)
            # an actual answer datagram: keep waiting (the LAN listener never answers)
            return
        err = st.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0:
            self._finish(ref, "connected")
        elif err == errno.ECONNREFUSED:
            self._finish(ref, "refused")
        else:
            self._finish(ref, "error", errno=err)

    # -- one-shot helpers (blocking, short) ---------------------------------------------------
    @staticmethod
    def http(host: str, port: int, path: str, timeout: float) -> Msg:
        try:
            with socket.create_connection((host, port), timeout=timeout) as s:
                s.settimeout(timeout)
                s.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
                head = s.recv(64)
        except OSError as e:
            return {"status": None, "error": f"{type(e).__name__}: {e}"}
        parts = head.split(b" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            return {"status": None, "error": f"bad reply {head!r}"}
        return {"status": int(parts[1]), "error": ""}

    @staticmethod
    def natpmp(gateway: str, timeout: float) -> Msg:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            try:
                s.connect((gateway, 5351))
                s.send(b"\x00\x00")
                data = s.recv(64)
            except OSError as e:
                return {"result": None, "external_ip": "", "error": f"{type(e).__name__}: {e}"}
        if len(data) < 12:
            return {"result": None, "external_ip": "", "error": f"short reply {data!r}"}
        _ver, _op, result, _epoch = struct.unpack("!BBHI", data[:8])
        return {"result": result, "external_ip": socket.inet_ntoa(data[8:12]), "error": ""}

    @staticmethod
    def upnp_list(url: str) -> Msg:
        import miniupnpc

        u = miniupnpc.UPnP()
        u.selectigd(url)
        rows: list[list[Any]] = []
        i = 0
        while True:
            try:
                e = u.getgenericportmapping(i)
            except Exception as exc:  # miniupnpc raises bare Exception
                if "SpecifiedArrayIndexInvalid" in str(exc) or "713" in str(exc):
                    break
                raise
            if e is None:
                break
            eport, proto, (iclient, iport), desc, enabled, rhost, lease = e
            rows.append([proto, eport, iclient, iport, desc, enabled, rhost, lease])
            i += 1
        return {"mappings": rows}

    # -- main loop ---------------------------------------------------------------------------
    def on_stdin(self) -> None:
        try:
            chunk = os.read(sys.stdin.fileno(), 65536)
        except BlockingIOError:
            return
        if not chunk:
            self.running = False
            return
        self.inbuf += chunk
        while b"\n" in self.inbuf:
            line, self.inbuf = self.inbuf.split(b"\n", 1)
            if line.strip():
                self.handle(json.loads(line))

    def handle(self, req: Msg) -> None:
        rid = req.get("id")
        op = req.get("op")
        try:
            if op == "listen":
                reply = self.listen(req["proto"], int(req["port"]))
            elif op == "unlisten":
                reply = self.unlisten(req["proto"], int(req["port"]))
            elif op == "send":
                reply = self.send(
                    int(rid or 0), req["proto"], req["dst"], int(req["port"]), float(req["wait"])
                )
            elif op == "http":
                reply = self.http(req["host"], int(req["port"]), req["path"], req["timeout"])
            elif op == "natpmp":
                reply = self.natpmp(req["gateway"], float(req["timeout"]))
            elif op == "upnp_list":
                reply = self.upnp_list(req["url"])
            elif op == "quit":
                self.running = False
                reply = {"ok": True}
            else:
                reply = {"error": f"unknown op {op!r}"}
        except Exception as e:  # report, keep serving
            reply = {"error": f"{type(e).__name__}: {e}"}
        _emit({"id": rid, **reply})

    def run(self) -> None:
        _emit({"ev": "hello", "pid": os.getpid()})
        while self.running:
            now = time.monotonic()
            if now >= self.end:
                break
            for ref, st in list(self.sends.items()):
                if now >= st.deadline:
                    self._finish(ref, "timeout")
            wake = min([self.end, now + 1.0, *(st.deadline for st in self.sends.values())])
            for key, _mask in self.sel.select(max(0.0, wake - now)):
                kind, arg = key.data
                if kind == "stdin":
                    self.on_stdin()
                elif kind == "listener":
                    self.on_listener(arg)
                else:
                    self.on_send(arg)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-lifetime", type=float, default=3600.0)
    args = ap.parse_args()
    with contextlib.suppress(BrokenPipeError):
        Agent(args.max_lifetime).run()


if __name__ == "__main__":
    main()
