"""NAT-PMP (RFC 6886) and PCP (RFC 6887) backends.

Three layers: ``codec`` (sans-I/O bytes and result codes), ``transport`` (the UDP socket and
its retransmission schedule) and here ``NatPmpGateway`` and ``PcpGateway``: the ``Gateway``
protocol (their shared table and epoch machinery is ``portmap.PortMapGateway``).

Behaviour that differs from UPnP IGD:

* Lifetime 0 means *delete* in both protocols. ``add(spec, 0)`` (UPnP's "permanent") is sent as
  ``permanent_lifetime`` (86400 s by default) and the granted lifetime is returned, so the
  mapper renews it like any timed lease.
* Neither protocol can list or look up mappings. ``get()`` and ``list()`` report this client's
  own table of the mappings it was granted (until they expire, are deleted, or the router is
  seen to lose its state); they never show mappings made by other hosts or programs.
  ``delete()`` of a mapping this client does not hold raises ``NoSuchMapping`` without asking,
  unless it was ``adopt()``-ed: a mapping an earlier run of ours left (after a crash), taken up
  from the journal so that it can be deleted. NAT-PMP deletes name only the protocol and internal
  port (from the host that asks, RFC 6886 §3.4; miniupnpd 2.3.1 natpmp.c deletes only rules
  whose description starts "NAT-PMP", so never a UPnP or PCP mapping). PCP deletes must carry
  the nonce that created the mapping (RFC 6887 §11.1, §15; miniupnpd 2.3.1 keeps it as the
  rule's description "PCP MAP <nonce>" and answers NOT_AUTHORIZED to a delete with another one):
  with a ``nonce_key`` (kept in the journal) the nonce is derived from it and the mapping's
  protocol, internal client and port, so a later run reproduces it; the journal records it too.
* NAT-PMP maps ports only to the host that asks. PCP maps for another host with the
  THIRD_PARTY option, which routers refuse unless allowed (miniupnpd ``pcp_allow_thirdparty``).
* With ``exact_port`` (default) a mapping whose external port the router moved (the port is
  taken) is deleted again and reported as ``MappingConflict``; unless the spec says
  ``external_any``: then the assigned port is kept and returned in ``Granted`` (VPN gateways
  ignore the suggested port and pick their own, yimingliu/py-natpmp#12, gluetun#1882).
* Every reply's epoch is checked (RFC 6886 §3.6, RFC 6887 §8.5). When the router lost its state,
  the client's table is emptied, ``epoch_resets`` counts it and ``on_lost_state(reason)`` runs:
  re-apply every mapping.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import secrets
from typing import Unpack

from igdtrigger.core.errors import (
    ActionFailed,
    ConfigError,
    GatewayError,
    MalformedReply,
    NoSuchMapping,
    NotAuthorized,
)
from igdtrigger.core.model import MappingKey, MappingSpec, Proto
from igdtrigger.gateway.base import GatewayInfo, Granted
from igdtrigger.gateway.natpmp.codec import (
    DOUBLE_NAT_HINT,
    NONCE_LEN,
    PCP_VERSION,
    PMP_VERSION,
    PcpOption,
    PcpReply,
    PmpOp,
    PmpReply,
    build_pcp_announce,
    build_pcp_map,
    build_pmp_address_request,
    build_pmp_map_request,
    decode_ip16,
    decode_pmp_reply,
    match_pcp_announce,
    match_pcp_map,
    match_pmp_address,
    match_pmp_map,
    pcp_error,
    pmp_error,
    pmp_map_opcode,
)
from igdtrigger.gateway.natpmp.portmap import HeldMapping, PortMapGateway, PortMapOptions

__all__ = ["NatPmpGateway", "PcpGateway"]

log = logging.getLogger("igdtrigger.gateway.natpmp.backend")


class NatPmpGateway(PortMapGateway):
    """A router reached with NAT-PMP (RFC 6886) at ``gateway_ip:5351``.

    NAT-PMP maps ports only to the host that sends the request: a spec for another
    ``internal_client`` raises ``NotAuthorized`` without asking the router.
    """

    protocol = "nat-pmp"
    _rule = "nat-pmp"

    async def _probe(self) -> GatewayInfo:
        action = "NAT-PMP external address request"
        reply = await self.client.request(action, build_pmp_address_request(),
                                          match_pmp_address(action))
        self._observe_epoch(reply.epoch)
        notes: tuple[str, ...] = ()
        external = ""
        if reply.result == 3:
            notes = (f"router reports NAT-PMP result 3 (Network Failure): {DOUBLE_NAT_HINT}",)
        elif reply.result:
            raise pmp_error(action, reply.result)
        elif reply.external_ip and reply.external_ip != "0.0.0.0":
            external = reply.external_ip
        return self._gateway_info(external, "NAT-PMP", notes)

    _match_map = staticmethod(match_pmp_map)

    async def _send_map(self, action: str, proto: Proto, internal_port: int,
                        external_port: int, lifetime: int) -> PmpReply:
        """One mapping request; checks the epoch, raises for an error result."""
        payload = build_pmp_map_request(proto, internal_port, external_port, lifetime)
        match = match_pmp_map(action, pmp_map_opcode(proto), internal_port, lifetime == 0)
        async with self._slots:
            reply = await self.client.request(action, payload, match)
        self._observe_epoch(reply.epoch)
        if reply.result:
            raise pmp_error(action, reply.result)
        return reply

    async def _map(self, spec: MappingSpec, lease: int, exact: bool) -> Granted:
        """Map ``spec`` for ``lease`` s (0: ``permanent_lifetime``); returns what was granted.
        ``exact``: another external port than the spec's is undone and a ``MappingConflict``."""
        info = await self._ready()
        self._check_spec(spec)
        action = f"NAT-PMP map {spec.key}"
        if spec.internal_client != info.local_address:
            raise NotAuthorized(
                action, None, f"NAT-PMP can only map ports to the host that asks "
                f"({info.local_address}), not to {spec.internal_client}",
                f"run igdtrigger on {spec.internal_client}, or use PCP (with third-party "
                "mappings allowed on the router) or UPnP IGD")
        lifetime = self._lifetime(lease)
        # NAT-PMP names a mapping by (protocol, internal port): one request at a time per pair.
        async with self._lock(("pmp", spec.proto, spec.internal_port)):
            reply = await self._timed(action, self._send_map(
                action, spec.proto, spec.internal_port, spec.external_port, lifetime))
            assigned, granted = reply.external_port or 0, reply.lifetime or 0
            if granted == 0:
                raise ActionFailed(action, 0, "router granted lifetime 0 (no mapping)")
            # The router replaced any earlier mapping of this internal port.
            for key in [k for k, h in self._held.items() if h.spec.proto is spec.proto
                        and h.spec.internal_port == spec.internal_port]:
                self._forget(key)
            if assigned != spec.external_port and exact and not spec.external_any:
                self._forget(spec.key)
                try:
                    await self._send_map(f"{action} (undo)", spec.proto, spec.internal_port,
                                         0, 0)
                except GatewayError as exc:
                    log.warning("%s: could not delete the mapping on port %d: %s", action,
                                assigned, exc)
                raise self._conflict(action, spec, assigned)
            external = self._info.external_address if self._info is not None else ""
            self._remember(MappingKey(spec.proto, assigned),
                           HeldMapping(spec, assigned, external, granted, self.clock()))
            if granted != lifetime:
                log.debug("%s: asked %ds, granted %ds", action, lifetime, granted)
            return Granted(assigned, granted)

    def _adoptable(self, spec: MappingSpec, nonce: bytes) -> bool:
        # The router takes a delete for the address that sends it: another host's mapping
        # (an earlier run on UPnP, say) would be mistaken for this host's own.
        return self._info is not None and spec.internal_client == self._info.local_address

    async def delete(self, proto: Proto, external_port: int) -> None:
        """Delete a mapping this client made or adopted; ``NoSuchMapping`` for any other.
        The router confirms nothing (it answers success whether or not it held one)."""
        key = MappingKey(proto, external_port)
        action = f"NAT-PMP delete {key}"
        held = self._known(key)
        if held is None:
            raise NoSuchMapping(action, None, "this client holds no such mapping",
                                "NAT-PMP cannot delete mappings made by other clients")
        await self._ready()
        async with self._lock(("pmp", proto, held.spec.internal_port)):
            await self._timed(action, self._send_map(action, proto, held.spec.internal_port,
                                                     0, 0))
            if self._known(key) is held:
                self._forget(key)


class PcpGateway(PortMapGateway):
    """A router reached with PCP (RFC 6887) at ``gateway_ip:5351``.

    ``client_ip`` is the PCP client address field (default: the local address of the socket,
    which is what the router sees). Specs for another ``internal_client`` are sent with the
    THIRD_PARTY option. ``probe_address`` asks for the external address with one short NAT-PMP
    request in ``connect`` (PCP has no such request); MAP replies update it too.
    ``prefer_failure`` adds the PREFER_FAILURE option (miniupnpd 2.3.1 ignores it; the
    ``exact_port`` check works either way). ``nonce_key``: derive mapping nonces from this
    secret (``mapping_nonce``) so that a later run can delete what this one left; without it
    they are random.
    """

    protocol = "pcp"
    _rule = "pcp"

    def __init__(
        self,
        gateway_ip: str,
        *,
        client_ip: str | None = None,
        probe_address: bool = True,
        prefer_failure: bool = False,
        nonce_key: bytes | None = None,
        **common: Unpack[PortMapOptions],
    ) -> None:
        super().__init__(gateway_ip, **common)
        if client_ip is not None:
            try:
                ipaddress.ip_address(client_ip)
            except ValueError:
                raise ConfigError(f"PCP client_ip {client_ip!r} is not an IP address") from None
        self.client_ip = client_ip
        self.probe_address = probe_address
        self.prefer_failure = prefer_failure
        self.nonce_key = nonce_key or None

    def mapping_nonce(self, spec: MappingSpec) -> bytes:
        """The nonce a MAP for ``spec`` is sent with: that of the mapping held or adopted for
        it, else HMAC-SHA-256 of the protocol, internal client and internal port (what a PCP
        server names a mapping by) under ``nonce_key``, cut to 12 bytes; b"" without a key."""
        known = self._known(spec.key)
        if known is not None and self._same_mapping(known, spec) and known.nonce:
            return known.nonce
        if not self.nonce_key:
            return b""
        msg = f"igdtrigger PCP MAP|{spec.proto.value}|{spec.internal_client}|" \
              f"{spec.internal_port}".encode()
        return hmac.new(self.nonce_key, msg, hashlib.sha256).digest()[:NONCE_LEN]

    def _adoptable(self, spec: MappingSpec, nonce: bytes) -> bool:
        return len(nonce) == NONCE_LEN  # without the nonce the router refuses the delete

    @staticmethod
    def _same_mapping(held: HeldMapping, spec: MappingSpec) -> bool:
        """A PCP server names a mapping by internal client, protocol and internal port."""
        return held.spec.internal_client == spec.internal_client \
            and held.spec.internal_port == spec.internal_port

    @property
    def _client_ip(self) -> str:
        return self.client_ip or self.client.local_address

    async def _probe(self) -> GatewayInfo:
        action = "PCP ANNOUNCE"
        reply = await self.client.request(action, build_pcp_announce(self._client_ip),
                                          match_pcp_announce(action))
        self._observe_epoch(reply.epoch)
        if reply.result not in (0, 4):  # UNSUPP_OPCODE still proves a PCP server
            raise pcp_error(action, reply.result, client_ip=self._client_ip)
        external = await self._probe_external() if self.probe_address else ""
        return self._gateway_info(external, "PCP", ())

    async def _probe_external(self) -> str:
        """One short NAT-PMP address request; "" when the router does not answer it."""

        def match(data: bytes) -> PmpReply | None:
            reply = decode_pmp_reply(data)
            if reply is None or reply.opcode != PmpOp.ADDRESS \
                    or reply.version not in (PMP_VERSION, PCP_VERSION):
                return None
            return reply

        try:
            reply = await self.client.request(
                "NAT-PMP external address request", build_pmp_address_request(), match,
                total_timeout=self.client.initial_timeout * 2)
        except GatewayError:
            return ""
        if reply.version != PMP_VERSION or reply.result or not reply.complete:
            return ""
        return "" if reply.external_ip in (None, "0.0.0.0") else str(reply.external_ip)

    _match_map = staticmethod(match_pcp_map)

    async def _send_map(self, action: str, spec: MappingSpec, nonce: bytes, lifetime: int,
                        *, external_port: int, external_ip: str) -> PcpReply:
        """One MAP request; checks the epoch, raises for an error result."""
        third_party = spec.internal_client if spec.internal_client != self._client_ip else None
        try:
            payload = build_pcp_map(
                nonce, spec.proto, spec.internal_port, external_port, lifetime,
                self._client_ip, external_ip=external_ip or "0.0.0.0", third_party=third_party,
                prefer_failure=self.prefer_failure and lifetime > 0)
        except ValueError as exc:
            raise ConfigError(f"{action}: {exc}") from None
        match = match_pcp_map(action, nonce, spec.proto, spec.internal_port, lifetime == 0)
        async with self._slots:
            reply = await self.client.request(action, payload, match)
        self._observe_epoch(reply.epoch)
        if reply.result:
            if lifetime == 0 and reply.result == 8:
                # miniupnpd answers NO_RESOURCES when there is nothing to delete.
                raise NoSuchMapping(action, 8, reply.result_text,
                                    "the router has no such mapping (miniupnpd's answer)")
            raise pcp_error(action, reply.result, third_party=third_party,
                            client_ip=self._client_ip)
        if third_party is not None:
            echoed = reply.option(PcpOption.THIRD_PARTY)
            if echoed is not None and decode_ip16(echoed) != third_party:
                raise MalformedReply(action, f"THIRD_PARTY in the reply is "
                                             f"{decode_ip16(echoed)}, not {third_party}")
        return reply

    async def _map(self, spec: MappingSpec, lease: int, exact: bool) -> Granted:
        """Map ``spec`` for ``lease`` s (0: ``permanent_lifetime``); returns what was granted.
        ``exact``: another external port than the spec's is undone and a ``MappingConflict``."""
        await self._ready()
        self._check_spec(spec)
        action = f"PCP MAP {spec.key}"
        lifetime = self._lifetime(lease)
        async with self._lock(("pcp", spec.key)):
            known = self._known(spec.key)
            if known is not None and self._same_mapping(known, spec):
                nonce, ext_ip = known.nonce, known.external_ip  # refresh: same nonce
            else:
                nonce, ext_ip = self.mapping_nonce(spec) or secrets.token_bytes(NONCE_LEN), ""
            reply = await self._timed(action, self._send_map(
                action, spec, nonce, lifetime, external_port=spec.external_port,
                external_ip=ext_ip))
            assigned, granted = reply.external_port or 0, reply.lifetime
            if granted == 0:
                raise ActionFailed(action, 0, "router granted lifetime 0 (no mapping)")
            self._set_external(reply.external_ip)
            if assigned != spec.external_port and exact and not spec.external_any:
                self._forget(spec.key)
                try:
                    await self._send_map(f"{action} (undo)", spec, nonce, 0,
                                         external_port=assigned,
                                         external_ip=reply.external_ip or "")
                except GatewayError as exc:
                    log.warning("%s: could not delete the mapping on port %d: %s", action,
                                assigned, exc)
                raise self._conflict(action, spec, assigned)
            self._remember(MappingKey(spec.proto, assigned),
                           HeldMapping(spec, assigned, reply.external_ip or "", granted,
                                       self.clock(), nonce))
            if granted != lifetime:
                log.debug("%s: asked %ds, granted %ds", action, lifetime, granted)
            return Granted(assigned, granted)

    async def delete(self, proto: Proto, external_port: int) -> None:
        """Delete a mapping this client made (with its nonce); ``NoSuchMapping`` otherwise."""
        key = MappingKey(proto, external_port)
        action = f"PCP delete {key}"
        held = self._known(key)
        if held is None:
            raise NoSuchMapping(action, None, "this client holds no such mapping",
                                "PCP deletes only with the nonce that created the mapping")
        await self._ready()
        async with self._lock(("pcp", key)):
            try:
                await self._timed(action, self._send_map(
                    action, held.spec, held.nonce, 0, external_port=held.external_port,
                    external_ip=held.external_ip))
            except NoSuchMapping:
                self._forget(key)
                raise
            if self._known(key) is held:
                self._forget(key)
