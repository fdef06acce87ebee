"""Case front (issue 14): a LAN client's mapping request through the front to the first WAN
packet delivered to the client, against the same done directly on the ISP router (the floor).

The double-NAT lab (tests/lab/doublenat.py): WAN host - ISP router (miniupnpd) - home router
running ``igdtrigger serve`` with ``[front]`` - client. Interleaved round by round:

* front: the client sends a NAT-PMP MAP request to the home router (10.8.0.1:5351); igdtrigger
  checks its policy, adds the inner DNAT rule (one nf_tables netlink batch) and maps the port on
  the ISP router (pointing at its own upstream address; the lookup before the add, then the
  add); measured from the request to the first WAN packet received by the client's socket on
  that port;
* floor: the home router itself sends the same NAT-PMP MAP request to the ISP router
  (192.168.77.1:5351), measured to the first WAN packet received on the home router.

The WAN host sends one UDP datagram every ~0.2 ms, each from a fresh socket (a fresh source port:
conntrack pins a flow's NAT decision at its first packet). Every socket is opened inside its
namespace from this process (``setns`` on the creating thread), so one clock times both ends.
Each mapping is deleted (lifetime 0) after its round. Ratio = front median / floor median;
target: front <= floor + 2 ms. With ``IGDTRIGGER_TRACE=<file>`` the serve process writes its
traces there and the result gains ``trace``: each step's median ms after the request arrived
(the warm-up rounds left out), printed too.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import socket
import statistics
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from .common import Bench, row, stats

NAME = "front"
FRONT_BASE = 42000
FLOOR_BASE = 44000
FLOOR_UPNP_BASE = 46000
TARGET_MS = 2.0
CLONE_NEWNET = 0x40000000
_NS_LOCK = threading.Lock()


@contextlib.contextmanager
def _in_netns(ns: str) -> Iterator[None]:
    """Run the block's socket creation inside network namespace ``ns`` (this thread only)."""
    libc = ctypes.CDLL(None, use_errno=True)
    with _NS_LOCK, open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{ns}") as target:
        if libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
        try:
            yield
        finally:
            if libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back failed")


def _udp(ns: str, bind: tuple[str, int] = ("0.0.0.0", 0)) -> socket.socket:
    with _in_netns(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(bind)
    return s


def _pmp_map(port: int, lifetime: int) -> bytes:
    return struct.pack("!BBHHHI", 0, 1, 0, port, port, lifetime)


def _ask(sock: socket.socket, gateway: str, payload: bytes, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    for _ in range(3):
        sock.sendto(payload, (gateway, 5351))
        with contextlib.suppress(TimeoutError):
            data, _ = sock.recvfrom(64)
            return data
    raise RuntimeError(f"no NAT-PMP answer from {gateway}")


def _first_packet(wan_ns: str, dst: str, port: int, listener: socket.socket, t0: float,
                  resend: Callable[[], object], limit: float = 5.0) -> float | None:
    """Blast from the WAN host until ``listener`` gets a datagram; seconds since ``t0``.
    ``resend`` retransmits the request every 250 ms, as NAT-PMP clients do (RFC 6886 §3.1)."""
    listener.setblocking(False)
    deadline = t0 + limit
    next_resend = t0 + 0.25
    while time.monotonic() < deadline:
        if time.monotonic() >= next_resend:
            resend()
            next_resend += 0.25
        s = _udp(wan_ns)
        try:
            s.sendto(b"x", (dst, port))
        finally:
            s.close()
        try:
            listener.recv(16)
            return time.monotonic() - t0
        except BlockingIOError:
            time.sleep(0.0002)
    return None


def _round(net: Any, mode: str, port: int, upnp: Any) -> float | None:
    lab = net.lab
    if mode == "front":
        ns, gateway, mapped_ns = net.clients[0], net.home_lan_ip, net.clients[0]
    else:
        ns, gateway, mapped_ns = net.home, lab.router_lan_ip, net.home
    asker = _udp(ns)
    listener = _udp(mapped_ns, ("0.0.0.0", port))
    try:
        t0 = time.monotonic()
        if mode == "floor_upnp":
            with _in_netns(ns):  # miniupnpc opens its HTTP connection inside the call
                upnp.addportmapping(port, "UDP", net.home_wan_ip, port, "bench floor", "")
        else:
            asker.sendto(_pmp_map(port, 60), (gateway, 5351))

        def resend() -> None:
            if mode != "floor_upnp":
                asker.sendto(_pmp_map(port, 60), (gateway, 5351))

        took = _first_packet(lab.wan, lab.router_wan_ip, port, listener, t0, resend)
        if mode == "floor_upnp":
            with _in_netns(ns):
                upnp.deleteportmapping(port, "UDP")
        else:
            asker.settimeout(5.0)
            with contextlib.suppress(TimeoutError):
                asker.recvfrom(64)  # the MAP answer (already there)
            _ask(asker, gateway, _pmp_map(port, 0))
        return took
    finally:
        asker.close()
        listener.close()


def trace_medians(path: str, skip: int) -> dict[str, float]:
    """Each traced step's median ms after the request (the mapper's lines, after the first
    ``skip``); the front's own ``activated``/``granted`` shifted by its ``front`` step."""
    steps: dict[str, list[float]] = {}
    try:
        with open(path, encoding="utf-8") as fh:
            lines = [json.loads(line) for line in fh if line.strip()]
    except (OSError, ValueError):
        return {}
    adds = [ln["steps"] for ln in lines if "steps" in ln][skip:]
    fronts = [ln["front"] for ln in lines if "front" in ln][skip:]
    for add, own in zip(adds, fronts, strict=False):
        at = dict(add)
        for what, ms in add:
            steps.setdefault(what, []).append(ms)
        for what, ms in own[1:]:
            steps.setdefault(what, []).append(at.get("front", 0.0) + ms)
    return {what: round(statistics.median(v), 3) for what, v in steps.items()}


def run(b: Bench) -> dict[str, Any]:
    assert b.lab is not None
    from tests.lab.doublenat import DoubleNat, FrontServe

    trace_file = os.environ.get("IGDTRIGGER_TRACE")
    if trace_file:
        with contextlib.suppress(OSError):
            os.unlink(trace_file)  # this run's adds only

    net = DoubleNat(b.lab, clients=1).build()
    b.workdir.mkdir(parents=True, exist_ok=True)
    serve = FrontServe(net, b.workdir)
    serve.start()
    import miniupnpc

    upnp = miniupnpc.UPnP()
    with _in_netns(net.home):
        upnp.selectigd(b.lab.igd_url)
    trials = 8 if b.quick else b.trials
    modes = ["front", "floor", "floor_upnp"]
    samples: dict[str, list[float]] = {m: [] for m in modes}
    missed = dict.fromkeys(modes, 0)
    warmup = 2
    try:
        for i in range(trials + warmup):
            k = i % len(modes)
            for mode in modes[k:] + modes[:k]:
                port = {"front": FRONT_BASE, "floor": FLOOR_BASE,
                        "floor_upnp": FLOOR_UPNP_BASE}[mode] + i
                took = _round(net, mode, port, upnp)
                if i < warmup:
                    continue
                if took is None:
                    missed[mode] += 1
                else:
                    samples[mode].append(took)
    finally:
        serve.stop()
        serve.close()
    front, floor, floor_upnp = (stats(samples[m]) for m in modes)
    ratio = (front["median"] / floor["median"]) if front.get("n") and floor.get("n") else None
    ok = (front["median"] <= floor["median"] + TARGET_MS) if ratio is not None else None
    up_ratio = (front["median"] / floor_upnp["median"]) if front.get("n") and \
        floor_upnp.get("n") else None
    note = ", ".join(f"{m} missed {missed[m]}" for m in modes if missed[m])
    traced = trace_medians(trace_file, warmup) if trace_file else {}
    if traced:
        print("[bench] front trace (median ms after the request): " + ", ".join(
            f"{k} {v:.2f}" for k, v in traced.items()), flush=True)
    print(f"[bench] front: median {front.get('median', float('nan')):.2f} ms; floor NAT-PMP "
          f"{floor.get('median', float('nan')):.2f} ms (ratio {ratio or float('nan'):.2f}); "
          f"floor UPnP {floor_upnp.get('median', float('nan')):.2f} ms "
          f"(ratio {up_ratio or float('nan'):.2f})", flush=True)
    rows = [
        row(NAME, "client NAT-PMP request -> WAN packet at the client, via the front", front,
            "ms", ref="same NAT-PMP request straight to the ISP router",
            ref_median=floor.get("median"), ratio=ratio, target=f"<= floor + {TARGET_MS:g} ms",
            ok=ok, note=note, key=True),
        row(NAME, "floor: NAT-PMP request on the ISP router -> WAN packet", floor, "ms"),
        row(NAME, "floor: miniupnpc AddPortMapping on the ISP router -> WAN packet",
            floor_upnp, "ms", ratio=up_ratio, note="ratio: front / this floor"),
    ]
    return {"rows": rows, "ms": {m: stats(samples[m]) for m in modes}, "ratio": ratio,
            "ratio_upnp_floor": up_ratio, "missed": missed, "pid": os.getpid(), "trace": traced}
