"""The package version, in the lowest layer so that every layer may read it.

``igdtrigger.__version__`` re-exports it; pyproject.toml's ``version`` must carry the same string
(tests/test_package_face.py compares them).
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
