"""The HTTP edge: the aiohttp application (``app``), its access rules, request parsing, metrics,
connection guard, rate limits, OpenAPI document and dashboard. It talks to ``runtime.service``
only."""

