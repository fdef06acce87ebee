"""The pure core: rules, activations and the engine, the lease and ad-hoc policy, settings and
every error class. No sockets, files, threads or asyncio; time comes from an injected clock.
It imports nothing else of the package."""

