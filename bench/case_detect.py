"""Case 7, detect (no lab): what detection costs.

* conntrack: CPU per 1,000 new flows that match no rule (the common case on a busy LAN), in the
  parser with the ``wanted`` prefilter (kernel-layout messages, as Linux 6.x sends them); the
  floor is a bare ``struct.unpack_from`` of each message's header, the least any parser does;
* socket table: CPU per poll with 1,000 connected sockets open in this process (2,000 sockets
  counting the accepted ends), on the Linux path (``/proc/net``) and through psutil (the
  macOS/Windows path); the floor is reading the same four ``/proc/net`` files without parsing;
* process table: CPU per poll on this machine (its process count is in the note), on the Linux
  path (``/proc/<pid>/comm``) and through psutil; the floor is listing ``/proc``;
* flow matching with 1,000 rules is case ``engine``.

CPU is the polling thread's own (``time.thread_time``); medians of ``trials`` polls.
"""

from __future__ import annotations

import os
import random
import resource
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

from igdtrigger.detect.ctnetlink import ConntrackParser
from igdtrigger.detect.process import Matcher, scan_proc, scan_psutil
from igdtrigger.detect.sockets import SocketTableDetector, read_proc_net, read_psutil

from .common import Bench, row, stats

NAME = "detect"
SOCKETS = 1000
LINUX = sys.platform.startswith("linux")


def _cpu(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.thread_time()
        fn()
        out.append(time.thread_time() - t0)
    return out


def _open_sockets(count: int) -> list[socket.socket]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * count + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(count)
    socks = [srv]
    for _ in range(count):
        c = socket.create_connection(srv.getsockname())
        a, _ = srv.accept()
        socks += [c, a]
    return socks


def run(b: Bench) -> dict[str, Any]:
    n = 10 if b.quick else 30
    rows = []
    detail: dict[str, Any] = {}

    # conntrack: the parser with a prefilter that wants nothing
    from .conntrack_parse import kernel_message

    rng = random.Random(7)
    msgs = [kernel_message(rng) for _ in range(1000)]
    parser = ConntrackParser(wanted=lambda proto, port: False)
    header = struct.Struct("=IHHII")

    def parse_all() -> None:
        for m in msgs:
            parser.feed(m)

    def floor_all() -> None:
        for m in msgs:
            header.unpack_from(m)

    ct = stats(_cpu(parse_all, n))
    ct_floor = stats(_cpu(floor_all, n))
    rows.append(row(NAME, "floor: unpack each message header, 1,000 messages", ct_floor, "ms"))
    rows.append(row(NAME, "conntrack: parse + prefilter 1,000 non-matching new flows", ct, "ms",
                    ref="floor", ref_median=ct_floor["median"],
                    ratio=ct["median"] / ct_floor["median"], key=True,
                    note="the whole detector (recv, loop) adds the kernel path: see "
                         "bench/conntrack_parse.py"))

    # the socket table with 1,000 connections open
    socks = _open_sockets(SOCKETS)
    try:
        det = SocketTableDetector(reader=read_proc_net if LINUX else read_psutil,
                                  wanted=lambda proto, port: False)
        seen = len(det.reader())

        def raw_read() -> None:
            for name in ("tcp", "tcp6", "udp", "udp6"):
                try:
                    with open(f"/proc/net/{name}", "rb") as fh:
                        fh.read()
                except OSError:
                    pass

        if LINUX:
            floor = stats(_cpu(raw_read, n))
            rows.append(row(NAME, f"floor: read /proc/net/{{tcp,udp}}[6] ({seen} connected "
                                  "sockets)", floor, "ms"))
            proc = stats(_cpu(det.poll, n))
            rows.append(row(NAME, f"sockets (procfs): one poll, {SOCKETS} connections open",
                            proc, "ms", ref="floor", ref_median=floor["median"],
                            ratio=proc["median"] / floor["median"], key=True,
                            note=f"{proc['median'] * 1e-3 * 100:.2f} % of a core at the 1 s "
                                 "default interval"))
            detail["sockets_procfs_s"] = proc
        ps_det = SocketTableDetector(reader=read_psutil, wanted=lambda proto, port: False)
        ps = stats(_cpu(ps_det.poll, n))
        rows.append(row(NAME, f"sockets (psutil, the macOS/Windows path): one poll, {SOCKETS} "
                              "connections open", ps, "ms",
                        ref="procfs" if LINUX else "", ref_median=proc["median"] if LINUX
                        else None, ratio=ps["median"] / proc["median"] if LINUX else None))
    finally:
        for s in socks:
            s.close()

    # the process table
    matcher = Matcher(["eldenring.exe", "cs2", "factorygamesteam-win64-shipping.exe"])
    nproc = sum(1 for e in os.listdir("/proc") if e.isdigit()) if LINUX else 0
    if LINUX:
        pfloor = stats(_cpu(lambda: os.listdir("/proc"), n))
        rows.append(row(NAME, f"floor: list /proc ({nproc} processes)", pfloor, "ms"))
        pp = stats(_cpu(lambda: scan_proc(matcher), n))
        rows.append(row(NAME, f"process (procfs): one poll, {nproc} processes", pp, "ms",
                        ref="floor", ref_median=pfloor["median"],
                        ratio=pp["median"] / pfloor["median"], key=True))
    pps = stats(_cpu(lambda: scan_psutil(matcher), n))
    rows.append(row(NAME, "process (psutil, the macOS/Windows path): one poll", pps, "ms",
                    ref="procfs" if LINUX else "", ref_median=pp["median"] if LINUX else None,
                    ratio=pps["median"] / pp["median"] if LINUX else None))
    detail.update({"polls": n, "sockets_open": SOCKETS, "processes": nproc})
    return {"rows": rows, "detail": detail}
