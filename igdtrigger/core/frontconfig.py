"""``[front]`` as data: the IGD front's settings (parsed by :mod:`igdtrigger.front.settings`,
which documents each key). Pure: a frozen dataclass with its defaults (secure mode on, the
unprivileged-ports allow lines of :data:`igdtrigger.core.acl.DEFAULT_ACL`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from igdtrigger.core.acl import DEFAULT_ACL, Acl, parse_acl

__all__ = ["MAX_LEASE_LIMIT", "FrontConfig"]

MAX_LEASE_LIMIT = 604800.0  # IGDv2's longest lease


@dataclass(frozen=True, slots=True)
class FrontConfig:
    """``[front]``: each field is the key of the same name (see ``front/settings.py``)."""

    enabled: bool = False
    interfaces: tuple[str, ...] = ()
    acl: Acl = field(default_factory=lambda: parse_acl(DEFAULT_ACL))
    secure_mode: bool = True
    max_lease: float = 3600.0
    idle_timeout: float = 600.0
    max_per_client: int = 64
    http_port: int = 0
    forward_chain: str | None = None
    igd_version: int = 2  # 1: describe an IGDv1 (miniupnpd's force_igd_desc_v1)

    def to_json(self) -> dict[str, Any]:
        """For status and ``config``: the keys as written, the allow lines as text."""
        return {"enabled": self.enabled, "interfaces": list(self.interfaces),
                "allow": self.acl.to_json(), "secure_mode": self.secure_mode,
                "max_lease": self.max_lease, "idle_timeout": self.idle_timeout,
                "max_per_client": self.max_per_client, "http_port": self.http_port,
                "forward_chain": self.forward_chain, "igd_version": self.igd_version}
