"""The kernel-side prefilter of conntrack NEW events: a classic BPF program.

With ``ports`` set (the rules' trigger and opened ports), the event socket carries a filter
(``SO_ATTACH_FILTER``, as libnetfilter_conntrack's ``nfct_filter`` does) that drops a NEW event
whose canonical original tuple (the layout :mod:`igdtrigger.detect.ctnetlink` decodes on its
fast path) names a TCP/UDP destination port outside them (and a source port outside
``sources``, when given), and events of other protocols, before it is queued to us. Anything
the filter cannot read with certainty is let through to the parser.
:func:`build_filter` is pure; :func:`attach_filter` does the one ``setsockopt``.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Sequence

from igdtrigger.core.model import PortRange, Proto
from igdtrigger.detect.ctnetlink import (
    _BE16,
    _H4_DST,
    _H4_IP,
    _H4_ORIG,
    _H4_SRC,
    _H6_DST,
    _H6_IP,
    _H6_ORIG,
    _H6_SRC,
    _H_DPORT,
    _H_NUM,
    _H_PROTO,
    _H_SPORT,
    _PAYLOAD,
    AF_INET,
    AF_INET6,
    CT_NEW,
    NLMSG_HDRLEN,
)

__all__ = ["SO_ATTACH_FILTER", "attach_filter", "build_filter"]

SO_ATTACH_FILTER = 26
_BPF_MAXINSNS = 4096
_ACCEPT = 0xFFFFFFFF
_DROP = 0
_LD_W, _LD_H, _LD_B, _LD_MEM, _ST = 0x20, 0x28, 0x30, 0x60, 0x02
_JA, _JEQ, _JGT, _JGE, _RET = 0x05, 0x15, 0x25, 0x35, 0x06
_INSN = struct.Struct("=HBBI")  # struct sock_filter


def _be16_of_host(value: int) -> int:
    """What a BPF half-word load (big-endian) reads from a host-order u16 field."""
    swapped: int = _BE16.unpack(struct.pack("=H", value))[0]
    return swapped


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if out and first <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], last))
        else:
            out.append((first, last))
    return out


def build_filter(ports: Sequence[PortRange], sources: Sequence[PortRange] = (),
                 ) -> list[tuple[int, int, int, int]] | None:
    """A classic BPF program (``(code, jt, jf, k)`` instructions) for the NEW-event socket:
    accept a message unless it is a CT_NEW in the kernel's canonical layout (the parser's fast
    path) whose protocol is not TCP/UDP, or whose destination port is outside ``ports`` and
    whose source port is outside ``sources`` (the IGD front's mapped internal ports: an app
    starting flows from its mapped port, issue 14). ``None`` when the ports need more
    instructions than a filter may have."""
    by_proto = {p: _merge([(r.first, r.last) for r in ports if r.proto is p]) for p in Proto}
    by_source = {p: _merge([(r.first, r.last) for r in sources if r.proto is p]) for p in Proto}
    prog: list[tuple[int, int, int, int]] = []

    def accept_unless_eq(k: int) -> None:  # if A != k: accept
        prog.append((_JEQ, 1, 0, k))
        prog.append((_RET, 0, 0, _ACCEPT))

    def tuple_block(heads: list[tuple[int, int]], num_at: int, dport_at: int) -> None:
        for off, word in heads:
            prog.append((_LD_W, 0, 0, off))
            accept_unless_eq(word)
        prog.append((_LD_B, 0, 0, num_at))
        prog.append((_ST, 0, 0, 1))
        prog.append((_LD_H, 0, 0, dport_at))
        prog.append((_ST, 0, 0, 0))
        if sources:  # the source port's value sits 8 bytes before the destination port's
            prog.append((_LD_H, 0, 0, dport_at - 8))
            prog.append((_ST, 0, 0, 2))

    def accept_in(ranges: list[tuple[int, int]]) -> None:  # A in a range: accept
        for first, last in ranges:
            prog.append((_JGE, 0, 2, first))  # below: try the next range
            prog.append((_JGT, 1, 0, last))  # above: try the next range
            prog.append((_RET, 0, 0, _ACCEPT))

    prog.append((_LD_H, 0, 0, 4))  # nlmsg_type
    accept_unless_eq(_be16_of_host(CT_NEW))
    prog.append((_LD_B, 0, 0, NLMSG_HDRLEN))  # nfgen_family
    v6_jump = len(prog)
    prog.append((_JEQ, 0, 0, AF_INET6))  # jt patched below
    accept_unless_eq(AF_INET)
    a = _PAYLOAD
    tuple_block([(a, _H4_ORIG), (a + 4, _H4_IP), (a + 8, _H4_SRC), (a + 16, _H4_DST),
                 (a + 24, _H_PROTO), (a + 28, _H_NUM), (a + 36, _H_SPORT), (a + 44, _H_DPORT)],
                a + 32, a + 48)
    to_check = len(prog)
    prog.append((_JA, 0, 0, 0))  # k patched below
    v6_at = len(prog)
    tuple_block([(a, _H6_ORIG), (a + 4, _H6_IP), (a + 8, _H6_SRC), (a + 28, _H6_DST),
                 (a + 48, _H_PROTO), (a + 52, _H_NUM), (a + 60, _H_SPORT), (a + 68, _H_DPORT)],
                a + 56, a + 72)
    check_at = len(prog)
    prog[to_check] = (_JA, 0, 0, check_at - to_check - 1)
    prog[v6_jump] = (_JEQ, v6_at - v6_jump - 1, 0, AF_INET6)
    for proto in Proto:
        prog.append((_LD_MEM, 0, 0, 1))
        skip_at = len(prog)
        prog.append((_JEQ, 1, 0, proto.number))
        prog.append((_JA, 0, 0, 0))  # not this protocol: to the next section (patched)
        prog.append((_LD_MEM, 0, 0, 0))
        accept_in(by_proto[proto])
        if by_source[proto]:
            prog.append((_LD_MEM, 0, 0, 2))
            accept_in(by_source[proto])
        prog.append((_RET, 0, 0, _DROP))
        prog[skip_at + 1] = (_JA, 0, 0, len(prog) - skip_at - 2)
    prog.append((_RET, 0, 0, _DROP))  # neither TCP nor UDP
    if len(prog) > _BPF_MAXINSNS or any(jt > 255 or jf > 255 for _, jt, jf, _ in prog):
        return None
    return prog


def attach_filter(sock: socket.socket, prog: list[tuple[int, int, int, int]]) -> None:
    """``SO_ATTACH_FILTER`` (no privilege needed); raises OSError."""
    code = ctypes.create_string_buffer(b"".join(_INSN.pack(*i) for i in prog))
    fprog = struct.pack("HP", len(prog), ctypes.addressof(code))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
