"""The recovery kit: the node's recovery code and a QR code of it, shown once to be kept.

After a house fire the recovery code and a friend's invite code are all a new node needs
to get everything back (the code is the node secret: the same identity, the same data keys;
``engine/recovery_code.py``). The repair issue "Save your recovery kit" (``issues.py``)
stays until the user confirms, in its fix flow (``repairs.py``), that the code is stored
outside the house; the confirmation is kept in the entry's data (``CONF_KIT_SAVED``).

The QR code goes into the fix flow's description, which Home Assistant's frontend renders as
sanitised markdown: an image with a ``data:image/`` URI is one of the few things it lets
through, so the QR is an SVG (one path, no script, no external reference) in such a URI.
It encodes the code exactly as shown (``XXXX-XXXX-…``) in QR's alphanumeric mode, error
correction M: version 4, 33 × 33 modules. The code is as secret as the key: nothing here
logs it, and it is never stored (not in the entry, not in the issue: the flow reads it
from the key file each time it is shown).
"""

from __future__ import annotations

import base64
from pathlib import Path

import pyqrcode  # type: ignore[import-untyped]

from .engine import load_identity, recovery_code_of

# The light margin QR readers need around the symbol (4 modules, as the standard asks).
QUIET_ZONE = 4
# Pixels per module as shown: 41 modules × 5 = 205 px, readable by a phone off a screen.
MODULE_PIXELS = 5


def qr_matrix(code: str) -> list[list[int]]:
    """The QR symbol of ``code``: rows of modules, 1 dark, without the quiet zone."""
    symbol = pyqrcode.create(code, error="M", mode="alphanumeric")
    return [list(row) for row in symbol.code]


def qr_svg(code: str) -> str:
    """An SVG of the QR code of ``code``: a white square, one black path of dark modules."""
    matrix = qr_matrix(code)
    size = len(matrix) + 2 * QUIET_ZONE
    runs: list[str] = []
    for y, row in enumerate(matrix):
        x = 0
        while x < len(row):
            if not row[x]:
                x += 1
                continue
            start = x
            while x < len(row) and row[x]:
                x += 1
            runs.append(f"M{start + QUIET_ZONE} {y + QUIET_ZONE}h{x - start}v1h-{x - start}z")
    pixels = size * MODULE_PIXELS
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{pixels}" height="{pixels}" '
        f'viewBox="0 0 {size} {size}" shape-rendering="crispEdges">'
        f'<rect width="{size}" height="{size}" fill="#fff"/>'
        f'<path fill="#000" d="{"".join(runs)}"/></svg>'
    )


def qr_data_uri(code: str) -> str:
    """The QR code of ``code`` as a ``data:image/svg+xml`` URI (for markdown's image)."""
    data = base64.b64encode(qr_svg(code).encode("ascii")).decode("ascii")
    return f"data:image/svg+xml;base64,{data}"


def kit_of(key_file: Path) -> tuple[str, str]:
    """The recovery code of the node whose key is at ``key_file``, and its QR's URI (blocking).

    Raises ``KeyFileError`` when the key cannot be read.
    """
    code = recovery_code_of(load_identity(key_file))
    return code, qr_data_uri(code)
