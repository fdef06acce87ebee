"""``table inet igdtrigger`` over nf_tables netlink, for machines without the ``nft`` command.

Ubuntu desktops, for one, ship iptables (its nftables backend) but not ``nft``. This writes the
smallest table that makes the kernel track connections: one chain on the ``output`` hook and
one on ``forward`` (policy accept, priority 0), each with one rule ``ct state`` loaded into a
register plus a counter. The ``ct`` expression is what registers conntrack for the ``inet``
family (net/netfilter/nft_ct.c); the rule has no verdict and matches every packet, so it
changes nothing. Port matching and per-port counters stay with the ``nft`` path
(:mod:`.nfttrack`); here the table only turns tracking on.

Messages (encoded by :mod:`igdtrigger.nftnl`): one batch holding NEWTABLE, DELTABLE,
NEWTABLE, NEWCHAIN x2, NEWRULE x2: the kernel applies the whole batch or none of it, as
``nft -f`` does. Blocking calls; needs CAP_NET_ADMIN.
"""

from __future__ import annotations

from igdtrigger import nftnl
from igdtrigger.nftnl import (
    NF_ACCEPT,
    NF_INET_FORWARD,
    NF_INET_LOCAL_OUT,
    NFPROTO_INET,
    NFT_CT_STATE,
    NFT_MSG_DELTABLE,
    NFT_MSG_NEWCHAIN,
    NFT_MSG_NEWRULE,
    NFT_MSG_NEWTABLE,
    NFTA_CHAIN_HOOK,
    NFTA_CHAIN_NAME,
    NFTA_CHAIN_POLICY,
    NFTA_CHAIN_TABLE,
    NFTA_CHAIN_TYPE,
    NFTA_HOOK_HOOKNUM,
    NFTA_HOOK_PRIORITY,
    NFTA_TABLE_NAME,
    NLM_F_CREATE,
    Op,
    nest,
    str_attr,
    u32_attr,
)

__all__ = ["delete_table", "load_table", "table_exists"]


def _table_ops(name: str, *, define: bool) -> list[Op]:
    table = str_attr(NFTA_TABLE_NAME, name)
    ops = [Op(NFT_MSG_NEWTABLE, NFPROTO_INET, table, NLM_F_CREATE),
           Op(NFT_MSG_DELTABLE, NFPROTO_INET, table)]
    if not define:
        return ops
    ops.append(Op(NFT_MSG_NEWTABLE, NFPROTO_INET, table, NLM_F_CREATE))
    for chain, hook in (("track_out", NF_INET_LOCAL_OUT), ("track_fwd", NF_INET_FORWARD)):
        ops.append(Op(NFT_MSG_NEWCHAIN, NFPROTO_INET, b"".join([
            str_attr(NFTA_CHAIN_TABLE, name), str_attr(NFTA_CHAIN_NAME, chain),
            nest(NFTA_CHAIN_HOOK, [u32_attr(NFTA_HOOK_HOOKNUM, hook),
                                   u32_attr(NFTA_HOOK_PRIORITY, 0)]),
            u32_attr(NFTA_CHAIN_POLICY, NF_ACCEPT), str_attr(NFTA_CHAIN_TYPE, "filter")]),
            NLM_F_CREATE))
        ops.append(Op(NFT_MSG_NEWRULE, NFPROTO_INET, nftnl.rule_body(
            name, chain, [nftnl.ct(NFT_CT_STATE), nftnl.counter()]), NLM_F_CREATE))
    return ops


def load_table(name: str) -> None:
    """Replace ``table inet <name>`` with the tracking-only table, atomically. Raises
    ``NetlinkError`` (EPERM without CAP_NET_ADMIN)."""
    nftnl.batch(_table_ops(name, define=True))


def delete_table(name: str) -> None:
    """Delete ``table inet <name>`` whether or not it exists."""
    nftnl.batch(_table_ops(name, define=False))


def table_exists(name: str) -> bool:
    """Is ``table inet <name>`` loaded? Raises ``NetlinkError`` when the kernel will not say."""
    return nftnl.table_exists(NFPROTO_INET, name)
