"""Benchmark of the conntrack detector's hot path (not a test).

    python bench/conntrack_parse.py [--messages 200000]

Prints the parse rate of realistic kernel-layout IPCTNL_MSG_CT_NEW messages (one per datagram,
as the kernel sends events), with and without the ``wanted`` prefilter, on the generic
(non-canonical layout) path, and the CPU the whole detector (recv + event loop + parse) spends
per 1,000 flows that match no rule, fed through an AF_UNIX datagram socket by another process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from igdtrigger.core.model import Flow, Proto
from igdtrigger.detect.conntrack import ConntrackDetector
from igdtrigger.detect.ctnetlink import ConntrackParser

NESTED = 0x8000


def nla(atype: int, payload: bytes, nested: bool = False) -> bytes:
    length = 4 + len(payload)
    header = struct.pack("=HH", length, atype | (NESTED if nested else 0))
    return header + payload + bytes(-length % 4)


def tuple_attr(which: int, num: int, src: bytes, dst: bytes, sp: int, dp: int, n: bool) -> bytes:
    base = 1 if len(src) == 4 else 3
    ip = nla(1, nla(base, src) + nla(base + 1, dst), n)
    l4 = nla(1, bytes([num])) + nla(2, struct.pack("!H", sp)) + nla(3, struct.pack("!H", dp))
    return nla(which, ip + nla(2, l4, n), n)


def kernel_message(rng: random.Random, nested: bool = True) -> bytes:
    """A NEW event laid out as Linux 6.x sends it: ORIG, REPLY, ID, STATUS, TIMEOUT[, PROTOINFO]."""
    v6 = rng.random() < 0.2
    num = 6 if rng.random() < 0.5 else 17
    if v6:
        src = ipaddress.IPv6Address(rng.getrandbits(128)).packed
        dst = ipaddress.IPv6Address(rng.getrandbits(128)).packed
    else:
        src = ipaddress.IPv4Address(0xC0A80100 + rng.randrange(2, 250)).packed
        dst = ipaddress.IPv4Address(rng.getrandbits(32)).packed
    sp, dp = rng.randrange(1024, 65536), rng.choice([443, 80, 53, 123, 3478, rng.randrange(65536)])
    attrs = tuple_attr(1, num, src, dst, sp, dp, nested)
    attrs += tuple_attr(2, num, dst, src, dp, sp, nested)
    attrs += nla(12, struct.pack("!I", rng.getrandbits(32))) + nla(3, struct.pack("!I", 8))
    attrs += nla(7, struct.pack("!I", 120 if num == 6 else 30))
    if num == 6:
        tcp = nla(1, b"\x01") + nla(2, b"\x0a") + nla(3, b"\x00") + nla(4, b"\x03\x00")
        attrs += nla(4, nla(1, tcp + nla(5, b"\x00\x00"), nested), nested)
    body = struct.pack("!BBH", 10 if v6 else 2, 0, 0) + attrs
    return struct.pack("=IHHII", 16 + len(body), 0x0100, 0x0600, 0, 0) + body


def parse_rate(
    datagrams: list[bytes], parser: ConntrackParser, rounds: int = 3
) -> tuple[float, float]:
    """Best of ``rounds``: (messages per second, CPU microseconds per 1,000 messages)."""
    best_wall, best_cpu = float("inf"), float("inf")
    feed = parser.feed
    for _ in range(rounds):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for d in datagrams:
            feed(d)
        best_wall = min(best_wall, time.perf_counter() - wall0)
        best_cpu = min(best_cpu, time.process_time() - cpu0)
    n = len(datagrams)
    return n / best_wall, best_cpu / n * 1000 * 1e6


SENDER = """
import socket, sys
path, count = sys.argv[1], int(sys.argv[2])
data = sys.stdin.buffer.read()
msgs, off = [], 0
while off < len(data):
    n = int.from_bytes(data[off:off + 4], "little")
    msgs.append(data[off:off + n])
    off += (n + 3) & ~3
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.connect(path)
for i in range(count):
    s.send(msgs[i % len(msgs)])
"""


class UnixDetector(ConntrackDetector):
    """The real run loop on an AF_UNIX socket; ``wanted`` rejects everything, counting calls."""

    def __init__(self, sock: socket.socket, count: int) -> None:
        super().__init__(wanted=self._reject, quiet_hint_after=None)
        self.sock = sock
        self.left = count
        self.done = asyncio.Event()

    def _reject(self, proto: Proto, port: int) -> bool:
        self.left -= 1
        if self.left == 0:
            self.done.set()
        return False

    def _open(self, probe_timeout: float | None = None) -> socket.socket:
        return self.sock


async def end_to_end(datagrams: list[bytes], count: int) -> tuple[float, float]:
    """CPU of this process per 1,000 non-matching flows through the real run() loop."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ct.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        det = UnixDetector(sock, count)
        task = asyncio.create_task(det.run(lambda flow: None))
        await asyncio.sleep(0)
        blob = b"".join(datagrams[:1000])
        cpu0, wall0 = time.process_time(), time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", SENDER, path, str(count), stdin=subprocess.PIPE
        )
        await proc.communicate(blob)
        await det.done.wait()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert det.flows_filtered + det.flows_reported == count
    return cpu / count * 1000 * 1e6, count / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=200_000)
    args = ap.parse_args()
    rng = random.Random(42)
    corpus = [kernel_message(rng) for _ in range(20_000)]
    datagrams = (corpus * (args.messages // len(corpus) + 1))[: args.messages]
    generic = [kernel_message(rng, nested=False) for _ in range(20_000)]

    def never(proto: object, port: int) -> bool:
        return False

    def one_port(proto: object, port: int) -> bool:
        return port == 27015

    avg = sum(len(d) for d in corpus) / len(corpus)
    print(f"python {sys.version.split()[0]}; {len(datagrams)} NEW messages, avg {avg:.0f} bytes")
    print("one message per datagram, as the kernel sends events:")
    for label, data, parser in [
        ("no filter (builds every Flow)", datagrams, ConntrackParser()),
        ("wanted() rejects all (non-matching)", datagrams, ConntrackParser(never)),
        ("wanted() = port == 27015", datagrams, ConntrackParser(one_port)),
        ("generic path, no filter", generic * 5, ConntrackParser()),
        ("generic path, rejects all", generic * 5, ConntrackParser(never)),
    ]:
        rate, cpu = parse_rate(data, parser)
        print(f"  {label:38s} {rate / 1e3:8.0f}k msg/s  {cpu / 1e3:7.2f} ms CPU per 1000 flows")

    batched = [b"".join(datagrams[i : i + 32]) for i in range(0, len(datagrams), 32)]
    parser = ConntrackParser(never)
    rate, _ = parse_rate(batched, parser)
    print(f"  {'32 messages per datagram, rejects all':38s} {rate * 32 / 1e3:8.0f}k msg/s")

    flows: list[Flow] = ConntrackParser().feed(datagrams[0])
    assert flows, "benchmark corpus does not parse"

    count = min(args.messages, 100_000)
    cpu, rate = asyncio.run(end_to_end(datagrams, count))
    print(
        f"end to end (recv_into + asyncio add_reader + parse), {count} non-matching flows over "
        f"AF_UNIX:\n  {cpu / 1e3:.2f} ms CPU per 1000 flows ({rate / 1e3:.0f}k flows/s offered)"
    )


if __name__ == "__main__":
    main()
