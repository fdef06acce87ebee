"""igdtrigger: router-grade port triggering over UPnP IGD."""

from __future__ import annotations

__version__ = "0.1.0"
