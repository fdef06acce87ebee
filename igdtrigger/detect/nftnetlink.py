"""``table inet igdtrigger`` over nf_tables netlink, for machines without the ``nft`` command.

Ubuntu desktops, for one, ship iptables (its nftables backend) but not ``nft``. This writes the
smallest table that makes the kernel track connections: one chain on the ``output`` hook and
one on ``forward`` (policy accept, priority 0), each with one rule ``ct state`` loaded into a
register plus a counter. The ``ct`` expression is what registers conntrack for the ``inet``
family (net/netfilter/nft_ct.c); the rule has no verdict and matches every packet, so it
changes nothing. Port matching and per-port counters stay with the ``nft`` path
(:mod:`.nfttrack`); here the table only turns tracking on.

Messages (include/uapi/linux/netfilter/nf_tables.h, nfnetlink.h): one batch
(``NFNL_MSG_BATCH_BEGIN`` ... ``END``, res_id ``NFNL_SUBSYS_NFTABLES``) holding NEWTABLE,
DELTABLE, NEWTABLE, NEWCHAIN x2, NEWRULE x2, each with ``NLM_F_ACK``: the kernel applies the
whole batch or none of it, as ``nft -f`` does. Blocking calls; needs CAP_NET_ADMIN.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterable, Iterator

from igdtrigger.core.errors import NetlinkError

__all__ = ["delete_table", "load_table", "table_exists"]

NETLINK_NETFILTER = 12
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_CREATE = 0x400
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLA_F_NESTED = 0x8000

NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFT_MSG_NEWTABLE, NFT_MSG_GETTABLE, NFT_MSG_DELTABLE = 0, 1, 2
NFT_MSG_NEWCHAIN = 3
NFT_MSG_NEWRULE = 6
NFPROTO_INET = 1

NFTA_TABLE_NAME = 1
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME, NFTA_CHAIN_HOOK, NFTA_CHAIN_POLICY = 1, 3, 4, 5
NFTA_CHAIN_TYPE = 7
NFTA_HOOK_HOOKNUM, NFTA_HOOK_PRIORITY = 1, 2
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS = 1, 2, 4
NFTA_LIST_ELEM = 1
NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 2
NFTA_CT_DREG, NFTA_CT_KEY = 1, 2
NFT_REG_1 = 1
NFT_CT_STATE = 0
NF_ACCEPT = 1
NF_INET_FORWARD, NF_INET_LOCAL_OUT = 2, 3

_HDR = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")
_ATTR = struct.Struct("=HH")
_BE32 = struct.Struct("!I")


def _attr(kind: int, payload: bytes) -> bytes:
    raw = _ATTR.pack(_ATTR.size + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _nest(kind: int, parts: Iterable[bytes]) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(parts))


def _str(kind: int, text: str) -> bytes:
    return _attr(kind, text.encode() + b"\0")


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, _BE32.pack(value & 0xFFFFFFFF))


def _msg(kind: int, flags: int, seq: int, family: int, body: bytes, res_id: int = 0) -> bytes:
    payload = _NFGEN.pack(family, 0, socket.htons(res_id)) + body
    return _HDR.pack(_HDR.size + len(payload), kind, flags, seq, 0) + payload


def _nft(op: int) -> int:
    return (NFNL_SUBSYS_NFTABLES << 8) | op


def _table_ops(name: str, *, define: bool) -> list[tuple[int, bytes]]:
    ops = [(NFT_MSG_NEWTABLE, _str(NFTA_TABLE_NAME, name)),
           (NFT_MSG_DELTABLE, _str(NFTA_TABLE_NAME, name))]
    if not define:
        return ops
    ops.append((NFT_MSG_NEWTABLE, _str(NFTA_TABLE_NAME, name)))
    ct_rule = _nest(NFTA_LIST_ELEM, [_str(NFTA_EXPR_NAME, "ct"), _nest(NFTA_EXPR_DATA, [
        _u32(NFTA_CT_DREG, NFT_REG_1), _u32(NFTA_CT_KEY, NFT_CT_STATE)])])
    counter = _nest(NFTA_LIST_ELEM, [_str(NFTA_EXPR_NAME, "counter")])
    for chain, hook in (("track_out", NF_INET_LOCAL_OUT), ("track_fwd", NF_INET_FORWARD)):
        ops.append((NFT_MSG_NEWCHAIN, b"".join([
            _str(NFTA_CHAIN_TABLE, name), _str(NFTA_CHAIN_NAME, chain),
            _nest(NFTA_CHAIN_HOOK, [_u32(NFTA_HOOK_HOOKNUM, hook), _u32(NFTA_HOOK_PRIORITY, 0)]),
            _u32(NFTA_CHAIN_POLICY, NF_ACCEPT), _str(NFTA_CHAIN_TYPE, "filter")])))
        ops.append((NFT_MSG_NEWRULE, b"".join([
            _str(NFTA_RULE_TABLE, name), _str(NFTA_RULE_CHAIN, chain),
            _nest(NFTA_RULE_EXPRESSIONS, [ct_rule, counter])])))
    return ops


def _open() -> socket.socket:
    af_netlink = getattr(socket, "AF_NETLINK", None)
    if af_netlink is None:
        raise NetlinkError(errno.EAFNOSUPPORT, "no AF_NETLINK sockets here")
    sock = socket.socket(af_netlink, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.bind((0, 0))
    sock.settimeout(5.0)
    return sock


def _replies(sock: socket.socket) -> Iterator[tuple[int, int, int]]:
    """``(type, seq, errno)`` of each message the kernel sends back (errno 0 unless an
    NLMSG_ERROR carries one), datagram after datagram."""
    while True:
        data = sock.recv(65536)
        off = 0
        while off + _HDR.size <= len(data):
            mlen, mtype, _flags, seq, _pid = _HDR.unpack_from(data, off)
            if mlen < _HDR.size or off + mlen > len(data):
                break
            code = 0
            if mtype == NLMSG_ERROR and mlen >= _HDR.size + 4:
                code = -struct.unpack_from("=i", data, off + _HDR.size)[0]
            yield mtype, seq, code
            off += (mlen + 3) & ~3


def _acks(sock: socket.socket, seqs: set[int], batch: range) -> None:
    """Read until every ``seqs`` message is acknowledged; raise the first error (also one
    about the batch as a whole: without CAP_NET_ADMIN the kernel refuses BATCH_BEGIN)."""
    for mtype, seq, code in _replies(sock):
        if mtype != NLMSG_ERROR or seq not in batch:
            continue
        if code:  # the batch is aborted: no further acks come
            raise NetlinkError(code, os.strerror(code))
        seqs.discard(seq)
        if not seqs:
            return


def _batch(ops: list[tuple[int, bytes]]) -> None:
    base = (os.getpid() << 8) & 0x7FFFFF00 or 256
    parts = [_msg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, base, 0, b"", NFNL_SUBSYS_NFTABLES)]
    seqs: set[int] = set()
    for i, (op, body) in enumerate(ops, 1):
        flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if op != NFT_MSG_DELTABLE else 0)
        parts.append(_msg(_nft(op), flags, base + i, NFPROTO_INET, body))
        seqs.add(base + i)
    parts.append(_msg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, base + len(ops) + 1, 0, b"",
                      NFNL_SUBSYS_NFTABLES))
    with _open() as sock:
        sock.send(b"".join(parts))
        _acks(sock, seqs, range(base, base + len(ops) + 2))


def load_table(name: str) -> None:
    """Replace ``table inet <name>`` with the tracking-only table, atomically. Raises
    ``NetlinkError`` (EPERM without CAP_NET_ADMIN)."""
    _batch(_table_ops(name, define=True))


def delete_table(name: str) -> None:
    """Delete ``table inet <name>`` whether or not it exists."""
    _batch(_table_ops(name, define=False))


def table_exists(name: str) -> bool:
    """Is ``table inet <name>`` loaded? Raises ``NetlinkError`` when the kernel will not say."""
    seq = (os.getpid() << 8) & 0x7FFFFF00 or 256
    with _open() as sock:
        sock.send(_msg(_nft(NFT_MSG_GETTABLE), NLM_F_REQUEST | NLM_F_ACK, seq, NFPROTO_INET,
                       _str(NFTA_TABLE_NAME, name)))
        found = False
        for mtype, mseq, code in _replies(sock):
            if mseq != seq:
                continue
            if mtype == _nft(NFT_MSG_NEWTABLE):
                found = True
            elif code == errno.ENOENT:
                return False
            elif code:
                raise NetlinkError(code, os.strerror(code))
            elif mtype in (NLMSG_ERROR, NLMSG_DONE):
                return found
    return found
