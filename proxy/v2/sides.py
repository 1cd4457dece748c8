"""The two sides as a shadow comparison calls them (proxy/migration/shadow.py `Sides`), on the app's
own parts: the translation submits and reads back exactly as a client's call does, and the legacy
side is asked as the client would ask it, with the client's key (held in memory while the shadow
runs, never stored).
"""

from __future__ import annotations

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.compose.fetch import ImageFetcher
from proxy.compose.task import is_composed_id
from proxy.errors import V2Error
from proxy.keys import LEGACY, TASKS, TRANSLATOR
from proxy.migration.legacy import LegacyUnavailable
from proxy.migration.shadow import Refused
from proxy.v2.body import split_image
from proxy.v2.handlers import read_progress, submit_translation

SHADOW_AGENT = "upscale-v2-proxy (shadow)"


class AppSides:
    def __init__(self, app: web.Application, v3_images: ImageFetcher, v2_images: ImageFetcher) -> None:
        self._app, self._v3_images, self._v2_images = app, v3_images, v2_images

    async def submit_translation(self, body: bytes, key: str, fingerprint: str | None) -> tuple[str, tuple[str, ...]]:
        try:
            translation = self._app[TRANSLATOR].translate(*split_image(body))
        except V2Error as e:
            raise Refused(e.msg, e.feature) from None
        done = await submit_translation(self._app, translation, key, fingerprint)
        approximated = tuple(name for name, decision in translation.plan.decisions.items() if decision != "emulate")
        return done.task_id, approximated

    async def translation_progress(self, task_id: str, key: str, fingerprint: str | None) -> dict:
        return await read_progress(self._app, task_id, key, fingerprint, "")  # the image is read from the store

    async def translation_image(self, task_id: str, data: dict, fingerprint: str | None) -> bytes:
        if is_composed_id(task_id):
            png = await self._app[TASKS].image(task_id, fingerprint)
            if png is None:
                raise LookupError("the composed image is gone")
            return png
        return await self._v3_images.fetch(data["imgs"][0])

    async def legacy_submit(self, body: bytes, key: str) -> str:
        doc = (await self._legacy("POST", "/v2/upscale", key, body)).get("data") or {}
        return doc["task_id"]

    async def legacy_progress(self, task_id: str, key: str) -> dict:
        path = str(URL.build(path="/v2/progress", query={"task_id": task_id}))
        return (await self._legacy("GET", path, key, None))["data"]

    async def legacy_image(self, url: str) -> bytes:
        return await self._v2_images.fetch(url)

    async def _legacy(self, method: str, path: str, key: str, body: bytes | None) -> dict:
        headers = CIMultiDict({"Authorization": f"Bearer {key}", "User-Agent": SHADOW_AGENT})
        if body is not None:
            headers["Content-Type"] = "application/json"
        reply = await self._app[LEGACY].send(method, path, headers, body)
        if reply.code != 0 or reply.data is None:
            raise LegacyUnavailable(f"V2 answered code {reply.code}: {reply.doc['msg']}")
        return reply.doc

