"""Gateway backends behind ``gateway.base.Gateway``: UPnP IGD (``upnp/``), NAT-PMP and PCP
(``natpmp/``), and the choice between them (``select``)."""
