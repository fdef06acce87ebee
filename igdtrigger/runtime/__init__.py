"""The I/O pipeline: ``pipeline`` (engine, mapper, pinholes and journal on one scheduler, for
``serve`` and ``run``), ``service`` (the façade the API talks to), ``compose`` (the one place
configuration becomes concrete detectors and gateways), the mapper, journal and their helpers.
It imports ``core``, ``config``, ``netutil`` and the ``gateway.base``/``detect.base``
interfaces only (``compose`` excepted)."""

