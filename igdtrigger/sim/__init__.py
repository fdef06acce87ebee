"""The simulated router (UPnP IGD over HTTP on loopback), for ``serve --simulate`` and tests."""
