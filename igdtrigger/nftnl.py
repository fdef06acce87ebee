"""nf_tables over netlink: messages, expressions and one atomic batch, without the ``nft`` command.

Shared by the conntrack tracking table (:mod:`igdtrigger.detect.nftnetlink`, for machines
without ``nft``) and the IGD front's inner DNAT (:mod:`igdtrigger.front.dnat`, where one rule
added or deleted over netlink takes a fraction of a millisecond instead of an ``nft`` process's
several). Encodes what ``nft`` itself sends (include/uapi/linux/netfilter/nf_tables.h,
nfnetlink.h; libnftnl's expression layouts), so ``nft list`` shows our rules as its own.

:func:`batch` sends ``NFNL_MSG_BATCH_BEGIN`` ... ``END`` (res_id ``NFNL_SUBSYS_NFTABLES``) with
every message ``NLM_F_ACK``: the kernel applies the whole batch or none of it, as ``nft -f``
does, and answers each message; a NEWRULE sent with ``echo=True`` comes back with its handle
(:attr:`Reply.handle`). Blocking calls (one ``sendmsg``, the kernel answers at once); need
CAP_NET_ADMIN. Errors: :class:`~igdtrigger.core.errors.NetlinkError` with the kernel's errno.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import socket
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from igdtrigger.core.errors import NetlinkError

__all__ = ["Op", "Opener", "Reply", "batch", "bitwise", "cmp", "counter", "ct", "fib", "host32",
           "ifname", "immediate", "ipv4", "meta", "nat", "nest", "open_socket", "payload", "port",
           "rule_body", "rule_counters", "rule_handle", "str_attr", "table_exists", "u32_attr",
           "verdict"]

NETLINK_NETFILTER = 12
NLM_F_REQUEST, NLM_F_ACK, NLM_F_ECHO = 0x1, 0x4, 0x8
NLM_F_APPEND, NLM_F_CREATE = 0x800, 0x400
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWTABLE, NFT_MSG_GETTABLE, NFT_MSG_DELTABLE = 0, 1, 2
NFT_MSG_NEWCHAIN = 3
NFT_MSG_NEWRULE, NFT_MSG_GETRULE, NFT_MSG_DELRULE = 6, 7, 8
NLM_F_DUMP = 0x300
NFPROTO_INET, NFPROTO_IPV4 = 1, 2
FAMILIES = {"inet": NFPROTO_INET, "ip": NFPROTO_IPV4, "arp": 3, "netdev": 5, "bridge": 7,
            "ip6": 10}

NFTA_TABLE_NAME = 1
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME, NFTA_CHAIN_HOOK, NFTA_CHAIN_POLICY = 1, 3, 4, 5
NFTA_CHAIN_TYPE = 7
NFTA_HOOK_HOOKNUM, NFTA_HOOK_PRIORITY = 1, 2
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_HANDLE, NFTA_RULE_EXPRESSIONS = 1, 2, 3, 4
NFTA_RULE_USERDATA = 7
NFTNL_UDATA_RULE_COMMENT = 0  # libnftnl's TLV type in a rule's userdata (nft's "comment")
NFTA_LIST_ELEM = 1
NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 2
NFTA_DATA_VALUE, NFTA_DATA_VERDICT = 1, 2
NFTA_VERDICT_CODE = 1
NFT_REG_VERDICT = 0
NF_ACCEPT = 1
NF_INET_PRE_ROUTING, NF_INET_FORWARD, NF_INET_LOCAL_OUT = 0, 2, 3
NFT_REG_1, NFT_REG_2 = 1, 2

# expressions' attributes and keys
NFTA_META_DREG, NFTA_META_KEY = 1, 2
NFT_META_IIFNAME, NFT_META_NFPROTO, NFT_META_L4PROTO = 6, 15, 16
NFTA_CMP_SREG, NFTA_CMP_OP, NFTA_CMP_DATA = 1, 2, 3
NFT_CMP_EQ, NFT_CMP_NEQ = 0, 1
NFTA_PAYLOAD_DREG, NFTA_PAYLOAD_BASE, NFTA_PAYLOAD_OFFSET, NFTA_PAYLOAD_LEN = 1, 2, 3, 4
NFT_PAYLOAD_NETWORK_HEADER, NFT_PAYLOAD_TRANSPORT_HEADER = 1, 2
NFTA_FIB_DREG, NFTA_FIB_RESULT, NFTA_FIB_FLAGS = 1, 2, 3
NFT_FIB_RESULT_ADDRTYPE = 3
NFTA_FIB_F_DADDR = 1 << 1
RTN_LOCAL = 2
NFTA_CT_DREG, NFTA_CT_KEY = 1, 2
NFT_CT_STATE, NFT_CT_STATUS = 0, 2
IPS_DST_NAT = 1 << 5
NFTA_BITWISE_SREG, NFTA_BITWISE_DREG, NFTA_BITWISE_LEN = 1, 2, 3
NFTA_BITWISE_MASK, NFTA_BITWISE_XOR = 4, 5
NFTA_IMMEDIATE_DREG, NFTA_IMMEDIATE_DATA = 1, 2
NFTA_COUNTER_PACKETS = 2
NFTA_NAT_TYPE, NFTA_NAT_FAMILY, NFTA_NAT_REG_ADDR_MIN, NFTA_NAT_REG_PROTO_MIN = 1, 2, 3, 5
NFT_NAT_DNAT = 1
IFNAMSIZ = 16

_HDR = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")
_ATTR = struct.Struct("=HH")
_BE32 = struct.Struct("!I")
_BE64 = struct.Struct("!Q")
_HOST32 = struct.Struct("=I")

Opener = Callable[[], socket.socket]
"""Opens the netlink socket (injectable: a test opens it inside its own network namespace)."""


# --- attributes ---------------------------------------------------------------------------------

def attr(kind: int, data: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    raw = _ATTR.pack(_ATTR.size + len(data), kind) + data
    return raw + b"\0" * (-len(raw) % 4)


def nest(kind: int, parts: Iterable[bytes]) -> bytes:
    """A nested attribute holding ``parts``."""
    return attr(kind | NLA_F_NESTED, b"".join(parts))


def str_attr(kind: int, text: str) -> bytes:
    """A NUL-terminated string attribute."""
    return attr(kind, text.encode() + b"\0")


def u32_attr(kind: int, value: int) -> bytes:
    """A big-endian u32 attribute (nf_tables' integers are network order)."""
    return attr(kind, _BE32.pack(value & 0xFFFFFFFF))


def _data(kind: int, value: bytes) -> bytes:
    return nest(kind, [attr(NFTA_DATA_VALUE, value)])


# --- expressions (one NFTA_LIST_ELEM each; cached: a rule is mostly the same few expressions) -----

def _expr(name: str, parts: Sequence[bytes] = ()) -> bytes:
    body = [str_attr(NFTA_EXPR_NAME, name)]
    if parts:
        body.append(nest(NFTA_EXPR_DATA, parts))
    return nest(NFTA_LIST_ELEM, body)


@functools.lru_cache(maxsize=1024)
def meta(key: int, dreg: int = NFT_REG_1) -> bytes:
    """``meta load <key> => reg``."""
    return _expr("meta", [u32_attr(NFTA_META_DREG, dreg), u32_attr(NFTA_META_KEY, key)])


@functools.lru_cache(maxsize=1024)
def cmp(value: bytes, *, op: int = NFT_CMP_EQ, sreg: int = NFT_REG_1) -> bytes:
    """``cmp <op> reg <value>`` (``value``: the bytes as the register holds them)."""
    return _expr("cmp", [u32_attr(NFTA_CMP_SREG, sreg), u32_attr(NFTA_CMP_OP, op),
                         _data(NFTA_CMP_DATA, value)])


@functools.lru_cache(maxsize=1024)
def payload(base: int, offset: int, length: int, dreg: int = NFT_REG_1) -> bytes:
    """``payload load <length>b @ <base> header + <offset> => reg``."""
    return _expr("payload", [u32_attr(NFTA_PAYLOAD_DREG, dreg), u32_attr(NFTA_PAYLOAD_BASE, base),
                             u32_attr(NFTA_PAYLOAD_OFFSET, offset),
                             u32_attr(NFTA_PAYLOAD_LEN, length)])


@functools.lru_cache(maxsize=1024)
def fib(flags: int, result: int, dreg: int = NFT_REG_1) -> bytes:
    """``fib <flags> <result> => reg`` (``fib daddr type``: F_DADDR, RESULT_ADDRTYPE)."""
    return _expr("fib", [u32_attr(NFTA_FIB_DREG, dreg), u32_attr(NFTA_FIB_RESULT, result),
                         u32_attr(NFTA_FIB_FLAGS, flags)])


@functools.lru_cache(maxsize=1024)
def ct(key: int, dreg: int = NFT_REG_1) -> bytes:
    """``ct load <key> => reg``."""
    return _expr("ct", [u32_attr(NFTA_CT_DREG, dreg), u32_attr(NFTA_CT_KEY, key)])


@functools.lru_cache(maxsize=1024)
def bitwise(mask: bytes, xor: bytes, *, reg: int = NFT_REG_1) -> bytes:
    """``bitwise reg = (reg & mask) ^ xor``."""
    return _expr("bitwise", [u32_attr(NFTA_BITWISE_SREG, reg), u32_attr(NFTA_BITWISE_DREG, reg),
                             u32_attr(NFTA_BITWISE_LEN, len(mask)),
                             _data(NFTA_BITWISE_MASK, mask), _data(NFTA_BITWISE_XOR, xor)])


@functools.lru_cache(maxsize=1024)
def immediate(value: bytes, dreg: int) -> bytes:
    """``immediate reg <dreg> <value>``."""
    return _expr("immediate", [u32_attr(NFTA_IMMEDIATE_DREG, dreg),
                               _data(NFTA_IMMEDIATE_DATA, value)])


@functools.lru_cache(maxsize=1024)
def nat(kind: int, family: int, *, reg_addr: int, reg_proto: int) -> bytes:
    """``nat <kind> <family> addr_min reg <reg_addr> proto_min reg <reg_proto>``."""
    return _expr("nat", [u32_attr(NFTA_NAT_TYPE, kind), u32_attr(NFTA_NAT_FAMILY, family),
                         u32_attr(NFTA_NAT_REG_ADDR_MIN, reg_addr),
                         u32_attr(NFTA_NAT_REG_PROTO_MIN, reg_proto)])


@functools.lru_cache(maxsize=1024)
def verdict(code: int) -> bytes:
    """``immediate reg 0 <verdict>`` (``accept``: NF_ACCEPT)."""
    return _expr("immediate", [u32_attr(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT), nest(
        NFTA_IMMEDIATE_DATA, [nest(NFTA_DATA_VERDICT, [u32_attr(NFTA_VERDICT_CODE, code)])])])


@functools.lru_cache(maxsize=1024)
def counter() -> bytes:
    """``counter`` (from zero)."""
    return _expr("counter")


def host32(value: int) -> bytes:
    """A u32 in host order, as ``meta``/``ct``/``fib`` registers hold numbers."""
    return _HOST32.pack(value)


def ifname(name: str) -> bytes:
    """An interface name as ``meta iifname`` loads it: IFNAMSIZ bytes, zero padded."""
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ:
        raise ValueError(f"interface name {name!r} is not 1-15 bytes")
    return raw.ljust(IFNAMSIZ, b"\0")


def ipv4(address: str) -> bytes:
    """An IPv4 address in network order."""
    return ipaddress.IPv4Address(address).packed


def port(number: int) -> bytes:
    """A port in network order."""
    return struct.pack("!H", number)


# --- messages -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Op:
    """One message of a batch: ``op`` (NFT_MSG_*), ``family`` (NFPROTO_*), its attributes;
    ``flags`` beyond REQUEST|ACK (``NLM_F_CREATE``, ``NLM_F_APPEND``); ``echo``: the kernel
    sends the object back (a new rule's handle)."""

    op: int
    family: int
    body: bytes
    flags: int = 0
    echo: bool = False


def rule_body(table: str, chain: str, exprs: Iterable[bytes], *, comment: str = "") -> bytes:
    """A NEWRULE's attributes: ``exprs`` for ``table``/``chain``; ``comment`` as nft keeps
    it (a TLV in the rule's userdata, libnftnl's NFTNL_UDATA_RULE_COMMENT)."""
    parts = [str_attr(NFTA_RULE_TABLE, table), str_attr(NFTA_RULE_CHAIN, chain),
             nest(NFTA_RULE_EXPRESSIONS, exprs)]
    if comment:
        text = comment.encode()[:254] + b"\0"
        parts.append(attr(NFTA_RULE_USERDATA, bytes([NFTNL_UDATA_RULE_COMMENT, len(text)]) + text))
    return b"".join(parts)


def rule_handle(table: str, chain: str, handle: int) -> bytes:
    """A DELRULE's attributes: the rule ``handle`` of ``table``/``chain``."""
    return b"".join([str_attr(NFTA_RULE_TABLE, table), str_attr(NFTA_RULE_CHAIN, chain),
                     attr(NFTA_RULE_HANDLE, _BE64.pack(handle))])


def _msg(kind: int, flags: int, seq: int, family: int, body: bytes, res_id: int = 0) -> bytes:
    data = _NFGEN.pack(family, 0, socket.htons(res_id)) + body
    return _HDR.pack(_HDR.size + len(data), kind, flags, seq, 0) + data


def _nft(op: int) -> int:
    return (NFNL_SUBSYS_NFTABLES << 8) | op


def open_socket() -> socket.socket:
    """A NETLINK_NETFILTER socket in this process's network namespace."""
    af_netlink = getattr(socket, "AF_NETLINK", None)
    if af_netlink is None:
        raise NetlinkError(errno.EAFNOSUPPORT, "no AF_NETLINK sockets here")
    sock = socket.socket(af_netlink, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.bind((0, 0))
        sock.settimeout(5.0)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass(frozen=True, slots=True)
class Reply:
    """A message the kernel sent back: its ``type``, ``seq``, ``error`` (errno, 0: none) and,
    for an echoed rule, ``handle`` (0 otherwise)."""

    type: int
    seq: int
    error: int = 0
    handle: int = 0


def _handle_of(data: bytes, off: int, end: int) -> int:
    off += _NFGEN.size
    while off + _ATTR.size <= end:
        alen, kind = _ATTR.unpack_from(data, off)
        if alen < _ATTR.size:
            break
        if kind & NLA_TYPE_MASK == NFTA_RULE_HANDLE and alen >= _ATTR.size + 8:
            return int(_BE64.unpack_from(data, off + _ATTR.size)[0])
        off += (alen + 3) & ~3
    return 0


def replies(sock: socket.socket) -> Iterator[Reply]:
    """Each message the kernel sends back, datagram after datagram."""
    while True:
        data = sock.recv(65536)
        off = 0
        while off + _HDR.size <= len(data):
            mlen, mtype, _flags, seq, _pid = _HDR.unpack_from(data, off)
            if mlen < _HDR.size or off + mlen > len(data):
                break
            code, handle = 0, 0
            if mtype == NLMSG_ERROR and mlen >= _HDR.size + 4:
                code = -struct.unpack_from("=i", data, off + _HDR.size)[0]
            elif mtype == _nft(NFT_MSG_NEWRULE):
                handle = _handle_of(data, off + _HDR.size, off + mlen)
            yield Reply(mtype, seq, code, handle)
            off += (mlen + 3) & ~3


def _seq_base() -> int:
    return (os.getpid() << 8) & 0x7FFFFF00 or 256


def batch(ops: Sequence[Op], *, opener: Opener = open_socket) -> list[int]:
    """Send ``ops`` as one transaction; wait for every answer. Returns, per op, the handle the
    kernel echoed (0 for ops without ``echo``). Raises ``NetlinkError`` with the first error
    (the kernel then applied nothing): EPERM without CAP_NET_ADMIN, ENOENT for a missing table,
    chain or rule, EEXIST, EINVAL for a message it cannot take."""
    base = _seq_base()
    parts = [_msg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, base, 0, b"", NFNL_SUBSYS_NFTABLES)]
    for i, op in enumerate(ops, 1):
        flags = NLM_F_REQUEST | NLM_F_ACK | op.flags | (NLM_F_ECHO if op.echo else 0)
        parts.append(_msg(_nft(op.op), flags, base + i, op.family, op.body))
    parts.append(_msg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, base + len(ops) + 1, 0, b"",
                      NFNL_SUBSYS_NFTABLES))
    waiting = set(range(base + 1, base + len(ops) + 1))
    handles = [0] * len(ops)
    with opener() as sock:
        sock.send(b"".join(parts))
        if not waiting:
            return handles
        for reply in replies(sock):
            if not base <= reply.seq <= base + len(ops) + 1:
                continue
            if reply.type == _nft(NFT_MSG_NEWRULE) and reply.seq in waiting:
                handles[reply.seq - base - 1] = reply.handle
            elif reply.type == NLMSG_ERROR:
                if reply.error:  # the batch is aborted: no further answers come
                    raise NetlinkError(reply.error, os.strerror(reply.error))
                waiting.discard(reply.seq)
                if not waiting:
                    break
    return handles


def _attrs(data: bytes, off: int, end: int) -> Iterator[tuple[int, int, int]]:
    """``(type, start, end)`` of each attribute's payload in ``data[off:end]``."""
    while off + _ATTR.size <= end:
        alen, kind = _ATTR.unpack_from(data, off)
        if alen < _ATTR.size or off + alen > end:
            return
        yield kind & NLA_TYPE_MASK, off + _ATTR.size, off + alen
        off += (alen + 3) & ~3


def _rule_counts(data: bytes, off: int, end: int) -> tuple[int, int]:
    """A dumped rule's handle and the packets of its ``counter`` (0 without one)."""
    handle, packets = 0, 0
    for kind, start, stop in _attrs(data, off + _NFGEN.size, end):
        if kind == NFTA_RULE_HANDLE and stop - start >= 8:
            handle = int(_BE64.unpack_from(data, start)[0])
        elif kind == NFTA_RULE_EXPRESSIONS:
            for _elem, e0, e1 in _attrs(data, start, stop):
                fields = {k: (a, b) for k, a, b in _attrs(data, e0, e1)}
                name = fields.get(NFTA_EXPR_NAME)
                body = fields.get(NFTA_EXPR_DATA)
                if name is None or body is None or data[name[0]:name[1]].rstrip(b"\0") != \
                        b"counter":
                    continue
                for k, a, b in _attrs(data, body[0], body[1]):
                    if k == NFTA_COUNTER_PACKETS and b - a >= 8:
                        packets += int(_BE64.unpack_from(data, a)[0])
    return handle, packets


def rule_counters(family: int, table: str, chain: str, *,
                  opener: Opener = open_socket) -> dict[int, int]:
    """Every rule of ``table``/``chain``: its handle -> the packets its counters counted (a
    GETRULE dump). Raises ``NetlinkError``: ENOENT when the table or chain is missing."""
    seq = _seq_base()
    body = str_attr(NFTA_RULE_TABLE, table) + str_attr(NFTA_RULE_CHAIN, chain)
    out: dict[int, int] = {}
    with opener() as sock:
        sock.send(_msg(_nft(NFT_MSG_GETRULE), NLM_F_REQUEST | NLM_F_DUMP, seq, family, body))
        while True:
            data = sock.recv(1 << 17)
            off = 0
            while off + _HDR.size <= len(data):
                mlen, mtype, _flags, mseq, _pid = _HDR.unpack_from(data, off)
                if mlen < _HDR.size or off + mlen > len(data):
                    break
                if mseq == seq:
                    if mtype == NLMSG_DONE:
                        return out
                    if mtype == NLMSG_ERROR and mlen >= _HDR.size + 4:
                        code = -struct.unpack_from("=i", data, off + _HDR.size)[0]
                        if code:
                            raise NetlinkError(code, os.strerror(code))
                        return out
                    if mtype == _nft(NFT_MSG_NEWRULE):
                        handle, packets = _rule_counts(data, off + _HDR.size, off + mlen)
                        out[handle] = packets
                off += (mlen + 3) & ~3


def table_exists(family: int, name: str, *, opener: Opener = open_socket) -> bool:
    """Is table ``name`` of ``family`` loaded? Raises ``NetlinkError`` when the kernel will
    not say."""
    seq = _seq_base()
    with opener() as sock:
        sock.send(_msg(_nft(NFT_MSG_GETTABLE), NLM_F_REQUEST | NLM_F_ACK, seq, family,
                       str_attr(NFTA_TABLE_NAME, name)))
        found = False
        for reply in replies(sock):
            if reply.seq != seq:
                continue
            if reply.type == _nft(NFT_MSG_NEWTABLE):
                found = True
            elif reply.error == errno.ENOENT:
                return False
            elif reply.error:
                raise NetlinkError(reply.error, os.strerror(reply.error))
            elif reply.type in (NLMSG_ERROR, NLMSG_DONE):
                return found
    return found
