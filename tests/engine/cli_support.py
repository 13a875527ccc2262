"""Running the engine's command line as a person does: one real process per command."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
import json
import os
from pathlib import Path
import sys
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Run:
    """What one command did."""

    code: int
    out: str
    err: str

    @property
    def summary(self) -> dict[str, Any]:
        """The JSON summary on the last line of stdout."""
        last = self.out.strip().splitlines()[-1]
        data: dict[str, Any] = json.loads(last)
        return data

    @property
    def reason(self) -> str:
        """The single line a failure prints on stderr."""
        lines = self.err.strip().splitlines()
        assert len(lines) == 1, self.err
        return lines[0]


async def spawn(
    *args: str | os.PathLike[str], stdout: int = asyncio.subprocess.DEVNULL
) -> asyncio.subprocess.Process:
    """Start ``python -m custom_components.mynas.engine ARGS`` from the repository; stderr piped."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "custom_components.mynas.engine",
        *map(str, args),
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
    )


async def mynas(*args: str | os.PathLike[str]) -> Run:
    """Run ``python -m custom_components.mynas.engine ARGS`` from the repository, to its end."""
    proc = await spawn(*args, stdout=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


def public_key_file(directory: Path, name: str, line: str) -> Path:
    """Write a public key line where the command line reads it (``--peer-key``)."""
    path = directory / f"{name}.pub"
    path.write_text(line + "\n")
    return path
