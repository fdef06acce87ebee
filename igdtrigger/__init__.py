"""igdtrigger: router-grade port triggering over UPnP IGD, NAT-PMP and PCP.

The package face, for scripts::

    from igdtrigger import Client, load_config, IgdTriggerError

    config = load_config()        # the TOML file (or defaults) plus IGDTRIGGER_* env
    client = Client()             # the running service's API: $IGDTRIGGER_SERVER or loopback
    status = client.request("GET", "/api/v1/status")   # raises an IgdTriggerError subclass

``Client`` (``igdtrigger.cli.client``), ``load_config`` and ``Config`` (``igdtrigger.config``),
every error class (``igdtrigger.core.errors``, rooted at ``IgdTriggerError``) and
``__version__`` (``igdtrigger.core.version``, where the package's own modules read it) are loaded on
first use: ``import igdtrigger`` alone imports nothing more, so ``igdtrigger run`` (a game
launcher's hook) starts as fast as the interpreter allows and never imports aiohttp or zeroconf.
"""

from __future__ import annotations

import importlib

# typing is not imported: ~3 ms of every start-up, a game launcher's hook's included (issue 17)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from igdtrigger.cli.client import Client
    from igdtrigger.config import Config, load_config
    from igdtrigger.core.errors import (
        ActionFailed,
        ActivationLimit,
        ActivationNotFound,
        ApiError,
        ConfigError,
        GatewayError,
        GatewayNotFound,
        HostNotAllowed,
        IgdTriggerError,
        RuleNotFound,
        ServiceUnavailable,
        UsageError,
    )
    from igdtrigger.core.version import __version__

__all__ = [
    "ActionFailed", "ActivationLimit", "ActivationNotFound", "ApiError", "Client", "Config",
    "ConfigError", "GatewayError", "GatewayNotFound", "HostNotAllowed", "IgdTriggerError",
    "RuleNotFound", "ServiceUnavailable", "UsageError", "__version__", "load_config",
]

# name -> the module that defines it (imported on first access, see __getattr__)
_LAZY = {name: "igdtrigger.core.errors" for name in __all__}
_LAZY.update(Client="igdtrigger.cli.client", Config="igdtrigger.config",
             load_config="igdtrigger.config", __version__="igdtrigger.core.version")


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'igdtrigger' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
