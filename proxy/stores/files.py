"""The embedded result store: one file per blob, written atomically (temp file, then rename)."""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
from pathlib import Path

_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,200}")


class FileResultStore:
    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._folder = folder

    def _path(self, name: str) -> Path:
        if not _NAME.fullmatch(name) or name.startswith("."):
            raise ValueError(f"bad blob name {name!r}")
        return self._folder / name

    async def put(self, name: str, data: bytes, ttl: float | None = None) -> None:  # the sweep expires it
        await asyncio.to_thread(self._write, self._path(name), data)

    def _write(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self._folder, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    async def get(self, name: str) -> bytes | None:
        try:
            return await asyncio.to_thread(self._path(name).read_bytes)
        except FileNotFoundError:
            return None

    async def delete(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)
