"""UPnP IGD: codec (sans-I/O), HTTP, SSDP, the SOAP and miniupnpc backends, IPv6 pinholes."""
