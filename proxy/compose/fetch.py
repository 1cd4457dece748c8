"""Fetching V3's result images: only the URLs V3 gave for the task, only http(s), only to allowed
hosts, with a size cap and a timeout."""

from __future__ import annotations

import time
from collections.abc import Callable

import aiohttp
from yarl import URL


class FetchError(Exception):
    pass


class ImageFetcher:
    def __init__(self, session: aiohttp.ClientSession, allowed_hosts: frozenset[str],
                 max_bytes: int, timeout: float, observe: Callable[[str, float], None] | None = None) -> None:
        self._session = session
        self._hosts = allowed_hosts
        self._max = max_bytes
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._observe = observe or (lambda call, seconds: None)

    async def fetch(self, url: str) -> bytes:
        started = time.perf_counter()
        try:
            return await self._fetch(url)
        finally:
            self._observe("image", time.perf_counter() - started)

    async def _fetch(self, url: str) -> bytes:
        parsed = URL(url)
        if parsed.scheme not in ("http", "https"):
            raise FetchError(f"image URL scheme {parsed.scheme!r} refused")
        if (parsed.host or "").lower() not in self._hosts:
            raise FetchError(f"image host {parsed.host!r} is not allowed (UPSCALE_PROXY_IMAGE_HOSTS)")
        try:
            async with self._session.get(parsed, timeout=self._timeout, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise FetchError(f"image fetch answered HTTP {resp.status}")
                if (resp.content_length or 0) > self._max:
                    raise FetchError(f"image is over {self._max} bytes")
                data = bytearray()
                async for chunk in resp.content.iter_chunked(1 << 20):
                    data += chunk
                    if len(data) > self._max:
                        raise FetchError(f"image is over {self._max} bytes")
                return bytes(data)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise FetchError(f"image fetch failed: {e!r}") from e
