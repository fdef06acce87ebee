"""The IGD front: LAN apps' UPnP IGD, NAT-PMP and PCP requests become activations.

An edge, like ``api/``: :mod:`igdtrigger.front.manager` is the one place a client request
becomes (or ends) an activation; :mod:`igdtrigger.front.upnp` and ``front.pcp`` are the
protocol servers in front of it.
"""

__all__: list[str] = []
