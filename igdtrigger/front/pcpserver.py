"""The NAT-PMP/PCP server of the front: requests on UDP 5351 of the served interfaces -> the
front manager; restart announcements to 224.0.0.1:5350.

:class:`PortMapService` decides (no socket): one datagram and its source in, the response out,
asking the :class:`PortMapFront` (``front.manager.FrontManager``) for every mapping. The rules:

* NAT-PMP (RFC 6886): a mapping is the client's (protocol, internal port); asking again renews
  it with the external port it already has; any external port may be granted (the suggestion is
  a hint, §3.3); lifetime 0 deletes it (with internal port 0: every mapping of the client for
  that protocol, §3.4); deleting what does not exist succeeds. NAT-PMP maps only for the asking
  host. A client never touches a UPnP or PCP mapping through NAT-PMP (miniupnpd 2.3.1 likewise
  deletes only its "NAT-PMP" rules).
* PCP (RFC 6887): a mapping is (internal address, protocol, internal port) and belongs to the
  nonce that created it (§11.1): another nonce gets NOT_AUTHORIZED. The suggested external port
  is granted or, without PREFER_FAILURE, another one; with PREFER_FAILURE a port or a suggested
  external address that cannot be given gets CANNOT_PROVIDE_EXTERNAL (§13.2). THIRD_PARTY asks
  for another host: the manager's policy decides (secure mode refuses: NOT_AUTHORIZED).
* Refusals map as the contract's table: NOT_AUTHORIZED/OTHER_CLIENT -> PMP 2 / PCP
  NOT_AUTHORIZED; CONFLICT -> PMP 4 / PCP CANNOT_PROVIDE_EXTERNAL; NO_RESOURCES -> 4 /
  NO_RESOURCES; UPSTREAM -> 3 / NETWORK_FAILURE.
* Bounds a LAN host cannot grow: a token bucket per host (``rate``/``burst``; over it the
  datagram is dropped, as a retransmitting client expects of a busy server), at most
  ``per_host`` requests of one host in progress, ``max_pending`` in all, and a retransmission
  of a request still in progress is dropped (the answer to the first one answers it).

:class:`PcpServer` is the transport: one socket per served address, and the announcements of
RFC 6886 §3.2.1 / RFC 6887 §14.1.3 on start (the NAT-PMP address reply and the PCP ANNOUNCE
response, multicast up to 10 times, 250 ms apart then doubling).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Protocol, cast

from igdtrigger.api.ratelimit import RateLimiter
from igdtrigger.core import trace
from igdtrigger.core.model import Proto
from igdtrigger.front.manager import (
    ClientRequest,
    FrontMapping,
    FrontProtocol,
    Grant,
    Refusal,
    RefusalKind,
)
from igdtrigger.front.pcp import (
    PcpAnnounceRequest,
    PcpMapRequest,
    PcpResult,
    PmpAddressRequest,
    PmpMapRequest,
    PmpResult,
    Rejected,
    build_pcp_announce_response,
    build_pcp_map_response,
    build_pmp_address_response,
    build_pmp_map_response,
    map_conflict,
    parse_request,
)
from igdtrigger.gateway.natpmp.codec import ANNOUNCE_GROUP, ANNOUNCE_PORT, SERVER_PORT
from igdtrigger.netutil import host_key

__all__ = ["PcpServer", "PortMapFront", "PortMapService"]

log = logging.getLogger(__name__)

_PMP_CODES = {
    RefusalKind.NOT_AUTHORIZED: PmpResult.NOT_AUTHORIZED,
    RefusalKind.OTHER_CLIENT: PmpResult.NOT_AUTHORIZED,
    RefusalKind.CONFLICT: PmpResult.NO_RESOURCES,
    RefusalKind.NO_RESOURCES: PmpResult.NO_RESOURCES,
    RefusalKind.UPSTREAM: PmpResult.NETWORK_FAILURE,
    RefusalKind.NO_SUCH: PmpResult.SUCCESS,
}
_PCP_CODES = {
    RefusalKind.NOT_AUTHORIZED: PcpResult.NOT_AUTHORIZED,
    RefusalKind.OTHER_CLIENT: PcpResult.NOT_AUTHORIZED,
    RefusalKind.CONFLICT: PcpResult.CANNOT_PROVIDE_EXTERNAL,
    RefusalKind.NO_RESOURCES: PcpResult.NO_RESOURCES,
    RefusalKind.UPSTREAM: PcpResult.NETWORK_FAILURE,
    RefusalKind.NO_SUCH: PcpResult.SUCCESS,
}


class PortMapFront(Protocol):
    """What the server needs of ``front.manager.FrontManager``."""

    async def add(self, req: ClientRequest) -> Grant | Refusal:
        """Grant or renew ``req``'s mapping, or say why not."""
        ...

    async def delete(self, protocol: FrontProtocol, client: str, external_port: int,
                     proto: Proto, nonce: bytes | None = None) -> Refusal | None:
        """End a mapping; ``None`` when done."""
        ...

    def mappings(self) -> list[FrontMapping]:
        """The live mappings."""
        ...

    async def external_address(self) -> str | None:
        """The upstream router's external address (``None``: unknown)."""
        ...

    def epoch(self) -> int:
        """Seconds since the front started serving."""
        ...


def _lifetime(lease: float) -> int:
    return max(1, min(int(lease), 0xFFFFFFFF))


class PortMapService:
    """NAT-PMP + PCP request handling over a :class:`PortMapFront` (no I/O of its own).

    ``counters``: requests by outcome (``pmp_ok``, ``pcp_ok``, ``rejected``, ``refused``,
    ``rate_limited``, ``busy``, ``duplicate``, ``dropped``)."""

    def __init__(self, front: PortMapFront, *, rate: float = 20.0, burst: int = 64,
                 per_host: int = 4, max_pending: int = 64,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.front = front
        self.limiter = RateLimiter(rate, burst, clock=clock)
        self.per_host = per_host
        self.max_pending = max_pending
        self.counters: collections.Counter[str] = collections.Counter()
        self._pending: dict[str, int] = {}
        self._inflight: set[tuple[str, bytes]] = set()

    def epoch(self) -> int:
        """The epoch written into every response (RFC 6886 §3.6, RFC 6887 §8.5), 32 bits."""
        return self.front.epoch() & 0xFFFFFFFF

    # -- admission ------------------------------------------------------------------------------
    def admit(self, data: bytes, source: str) -> bool:
        """May this datagram be handled now? If so it is counted in progress until
        :meth:`serve` answers it; if not, the counters say why."""
        key = host_key(source)
        if (source, data) in self._inflight:
            self.counters["duplicate"] += 1
            return False
        if self.limiter.take(key) > 0:
            self.counters["rate_limited"] += 1
            return False
        if self._pending.get(key, 0) >= self.per_host or \
                sum(self._pending.values()) >= self.max_pending:
            self.counters["busy"] += 1
            return False
        self._pending[key] = self._pending.get(key, 0) + 1
        self._inflight.add((source, data))
        return True

    async def handle(self, data: bytes, source: str) -> bytes | None:
        """The response to one datagram from ``source`` (``None``: send nothing)."""
        if not self.admit(data, source):
            return None
        return await self.serve(data, source)

    async def serve(self, data: bytes, source: str) -> bytes | None:
        """Answer a datagram :meth:`admit` let in (releases its place when done)."""
        key = host_key(source)
        try:
            return await self._dispatch(data, source)
        finally:
            self._inflight.discard((source, data))
            left = self._pending.pop(key, 1) - 1
            if left > 0:
                self._pending[key] = left

    async def _dispatch(self, data: bytes, source: str) -> bytes | None:
        req = parse_request(data, source, self.epoch())
        if isinstance(req, Rejected):
            self.counters["rejected" if req.response is not None else "dropped"] += 1
            log.info("NAT-PMP/PCP request from %s not served: %s", source, req.reason)
            return req.response
        if isinstance(req, PmpAddressRequest):
            self.counters["pmp_ok"] += 1
            return build_pmp_address_response(self.epoch(), await self.front.external_address())
        if isinstance(req, PmpMapRequest):
            return await self._pmp_map(req, source)
        if isinstance(req, PcpAnnounceRequest):
            self.counters["pcp_ok"] += 1
            return build_pcp_announce_response(self.epoch())
        return await self._pcp_map(req, source)

    def _held(self, protocol: FrontProtocol | None, internal_client: str, proto: Proto | None,
              internal_port: int) -> list[FrontMapping]:
        """The front's mappings of ``protocol`` (``None``: any) for this internal client (and
        port, unless 0, and protocol, unless ``None``)."""
        return [m for m in self.front.mappings()
                if protocol in (None, m.request.protocol)
                and m.request.internal_client == internal_client
                and (proto is None or m.request.proto is proto)
                and (internal_port == 0 or m.request.internal_port == internal_port)]

    def _refused(self, source: str, what: str, refusal: Refusal) -> None:
        self.counters["refused"] += 1
        log.info("%s from %s refused (%s): %s", what, source, refusal.kind.value, refusal.reason)

    # -- NAT-PMP --------------------------------------------------------------------------------
    async def _pmp_map(self, req: PmpMapRequest, source: str) -> bytes:
        held = self._held(FrontProtocol.NATPMP, source, req.proto, req.internal_port)
        what = f"NAT-PMP {req.proto.value} {req.internal_port}"
        if req.lifetime == 0:
            for m in held:
                gone = await self.front.delete(FrontProtocol.NATPMP, source,
                                               m.grant.external_port, req.proto)
                if gone is not None and gone.kind is not RefusalKind.NO_SUCH:
                    self._refused(source, f"{what} delete", gone)
                    return build_pmp_map_response(req, self.epoch(), _PMP_CODES[gone.kind])
            self.counters["pmp_ok"] += 1
            return build_pmp_map_response(req, self.epoch(), PmpResult.SUCCESS)
        answer = await self.front.add(ClientRequest(
            protocol=FrontProtocol.NATPMP, client=source, internal_client=source,
            internal_port=req.internal_port,
            external_port=held[0].grant.external_port if held else req.external_port,
            proto=req.proto, lease=float(req.lifetime), description=f"NAT-PMP {what[8:]}",
            allow_alternative=True))
        if isinstance(answer, Refusal):
            self._refused(source, what, answer)
            code = _PMP_CODES[answer.kind]
            return build_pmp_map_response(req, self.epoch(), code if code else
                                          PmpResult.NOT_AUTHORIZED)
        self.counters["pmp_ok"] += 1
        return build_pmp_map_response(req, self.epoch(), PmpResult.SUCCESS,
                                      answer.external_port, _lifetime(answer.lease))

    # -- PCP ------------------------------------------------------------------------------------
    async def _pcp_map(self, req: PcpMapRequest, source: str) -> bytes:
        held = self._held(FrontProtocol.PCP, req.internal_client, req.proto, req.internal_port)
        what = (f"PCP MAP {req.proto.value if req.proto else 'all'} "
                f"{req.internal_client}:{req.internal_port}")
        # s14d: RFC 6887 §11.3: never take over a mapping of this internal address, protocol
        # and port made with another nonce, or over UPnP/NAT-PMP (no nonce): front/pcp.py
        if (left := map_conflict(req, [(m.request.nonce, m.grant.lease) for m in self._held(
                None, req.internal_client, req.proto, req.internal_port)])) is not None:
            self.counters["refused"] += 1
            log.info("%s from %s refused: the mapping belongs to another nonce or protocol",
                     what, source)
            return build_pcp_map_response(req, self.epoch(), PcpResult.NOT_AUTHORIZED,
                                          lifetime=left)
        if req.lifetime == 0:
            return await self._pcp_delete(req, source, held, what)
        assert req.proto is not None  # parse_request: protocol 0 only with lifetime 0
        if req.external_ip and req.prefer_failure:
            current = await self.front.external_address()
            if current and current != req.external_ip:
                self.counters["refused"] += 1
                return build_pcp_map_response(req, self.epoch(),
                                              PcpResult.CANNOT_PROVIDE_EXTERNAL)
        answer = await self.front.add(ClientRequest(
            protocol=FrontProtocol.PCP, client=source, internal_client=req.internal_client,
            internal_port=req.internal_port,
            external_port=held[0].grant.external_port if held else req.external_port,
            proto=req.proto, lease=float(req.lifetime), description=f"PCP {what[8:]}",
            allow_alternative=not req.prefer_failure, nonce=req.nonce))
        if isinstance(answer, Refusal):
            self._refused(source, what, answer)
            code = _PCP_CODES[answer.kind]
            return build_pcp_map_response(req, self.epoch(), code if code else
                                          PcpResult.NOT_AUTHORIZED)
        self.counters["pcp_ok"] += 1
        return build_pcp_map_response(
            req, self.epoch(), PcpResult.SUCCESS, lifetime=_lifetime(answer.lease),
            external_port=answer.external_port,
            external_ip=answer.external_address or await self.front.external_address() or "")

    async def _pcp_delete(self, req: PcpMapRequest, source: str, held: list[FrontMapping],
                          what: str) -> bytes:
        port = req.external_port
        for m in held:
            gone = await self.front.delete(FrontProtocol.PCP, source, m.grant.external_port,
                                           m.request.proto, req.nonce)
            if gone is not None and gone.kind is not RefusalKind.NO_SUCH:
                self._refused(source, f"{what} delete", gone)
                return build_pcp_map_response(req, self.epoch(), _PCP_CODES[gone.kind])
            port = m.grant.external_port
        self.counters["pcp_ok"] += 1
        return build_pcp_map_response(req, self.epoch(), PcpResult.SUCCESS, lifetime=0,
                                      external_port=port,
                                      external_ip=await self.front.external_address() or "")


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, server: PcpServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self.server._received(self, data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("NAT-PMP/PCP socket error: %s", exc)


class PcpServer:
    """UDP 5351 on each of ``addresses`` (IPv4), serving through ``service``.

    ``start()`` binds every address (``OSError`` names the one that failed, after closing the
    others) and schedules the restart announcements; ``close()`` stops both. ``announce()``
    sends one round of them now; a change of the external address (checked every
    ``address_interval`` s) starts the rounds again (RFC 6886 §3.2.1)."""

    def __init__(self, service: PortMapService, addresses: Sequence[str], *,
                 port: int = SERVER_PORT, announce_group: str = ANNOUNCE_GROUP,
                 announce_port: int = ANNOUNCE_PORT, announce_count: int = 10,
                 announce_first: float = 0.25, address_interval: float = 5.0) -> None:
        self.service = service
        self.addresses = list(addresses)
        self.port = port
        self.announce_target = (announce_group, announce_port)
        self.announce_count = announce_count
        self.announce_first = announce_first
        self.address_interval = address_interval
        self._last_address: str | None = None
        self.bound: list[tuple[str, int]] = []
        self.announcements = 0
        self._endpoints: list[_Endpoint] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind every address and schedule the announcements (see the class docstring)."""
        loop = asyncio.get_running_loop()
        for address in self.addresses:
            try:
                transport, endpoint = await loop.create_datagram_endpoint(
                    lambda: _Endpoint(self), local_addr=(address, self.port),
                    family=socket.AF_INET)
            except OSError as exc:
                await self.close()
                raise OSError(exc.errno, f"NAT-PMP/PCP cannot listen on {address}:{self.port}: "
                              f"{exc.strerror or exc}") from exc
            sock = transport.get_extra_info("socket")
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                                socket.inet_aton(address))
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
            self._endpoints.append(endpoint)
            self.bound.append(sock.getsockname()[:2])
        log.info("NAT-PMP/PCP serving on %s", ", ".join(f"{a}:{p}" for a, p in self.bound))
        if self.announce_count > 0:
            self._last_address = await self.service.front.external_address()
            self._spawn(self._announce_rounds())
            self._spawn(self._watch_address())

    async def _watch_address(self) -> None:
        """RFC 6886 §3.2.1: announce again when the external address changes (the upstream
        router got a new one), so clients re-learn it and refresh their mappings."""
        while True:
            await asyncio.sleep(self.address_interval)
            address = await self.service.front.external_address()
            if address and address != self._last_address:
                log.info("NAT-PMP/PCP: external address now %s: announcing", address)
                self._last_address = address
                self._spawn(self._announce_rounds())

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _announce_rounds(self) -> None:
        delay = self.announce_first
        for i in range(self.announce_count):
            await self.announce()
            if i + 1 < self.announce_count:
                await asyncio.sleep(delay)
                delay *= 2

    async def announce(self) -> None:
        """Multicast the NAT-PMP address reply (when the external address is known) and the PCP
        ANNOUNCE response once from every bound address."""
        pmp = build_pmp_address_response(self.service.epoch(),
                                         await self.service.front.external_address())
        payloads = [build_pcp_announce_response(self.service.epoch())]
        if pmp[3] == PmpResult.SUCCESS:
            payloads.insert(0, pmp)
        for endpoint in self._endpoints:
            if endpoint.transport is None or endpoint.transport.is_closing():
                continue
            for payload in payloads:
                with contextlib.suppress(OSError):
                    endpoint.transport.sendto(payload, self.announce_target)
        self.announcements += 1

    def _received(self, endpoint: _Endpoint, data: bytes, addr: tuple[str | object, ...]) -> None:
        if trace.ON:
            trace.mark("pmp", first=True)
        source = str(addr[0])
        if not self.service.admit(data, source):
            return
        self._spawn(self._answer(endpoint, data, addr))

    async def _answer(self, endpoint: _Endpoint, data: bytes,
                      addr: tuple[str | object, ...]) -> None:
        try:
            response = await self.service.serve(data, str(addr[0]))
        except Exception:  # one bad request must not stop the server
            log.exception("NAT-PMP/PCP request from %s failed", addr[0])
            return
        if response is not None and endpoint.transport is not None \
                and not endpoint.transport.is_closing():
            endpoint.transport.sendto(response, addr)

    async def close(self) -> None:
        """Stop answering and announcing; close the sockets."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for endpoint in self._endpoints:
            if endpoint.transport is not None:
                endpoint.transport.close()
        self._endpoints.clear()
        self.bound.clear()

