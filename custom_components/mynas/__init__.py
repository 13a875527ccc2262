"""MyNAS: a friend-to-friend backup network of Home Assistant nodes and their USB disks.

Home Assistant's entry points (``async_setup_entry``, ``CONFIG_SCHEMA``...) live in
``hass_entry`` and load on first access (PEP 562 module ``__getattr__``). That keeps
``import custom_components.mynas.engine`` — the command line, the benchmark — from importing
Home Assistant itself (a second and 65 MB per process).
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import Any

# Listed once, at import (which Home Assistant does in a worker thread): no I/O later.
_SUBMODULES = frozenset(
    path.stem for path in Path(__file__).parent.iterdir() if path.suffix == ".py" or path.is_dir()
)


def __getattr__(name: str) -> Any:
    """Hand Home Assistant's lookups on to ``hass_entry``."""
    if name.startswith("__") or name in _SUBMODULES:
        # A submodule (``from . import issues``): the import system loads it, not hass_entry.
        raise AttributeError(name)
    return getattr(import_module(f"{__name__}.hass_entry"), name)
