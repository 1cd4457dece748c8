"""The V3 upscale request body, written around the client's base64 text without copying it."""

from __future__ import annotations

import orjson
from aiohttp import payload
from aiohttp.abc import AbstractStreamWriter

# Below this, copying the image is cheaper than two more sends; above it the copy would cost fresh
# pages (glibc's default mmap threshold), which dominate on these machines.
JOIN_BELOW = 128 * 1024


class UpscaleBody(payload.Payload):
    """`{"extra": {...}, "request": {..., "image_base64": "<the client's bytes>"}}`.

    The image is a view of the V2 request body; only the small JSON around it is new, so a 4 MB
    image is never copied into a second 4 MB string before it reaches the socket.
    """

    def __init__(self, model: str, scale_factor: float, image_b64: memoryview | bytes,
                 response_image_type: str = "png", webhook_url: str | None = None) -> None:
        extra: dict = {"response_image_type": response_image_type}
        if webhook_url:
            extra["webhook"] = {"url": webhook_url}
        head = orjson.dumps({"extra": extra, "request": {"model_name": model, "scale_factor": scale_factor}})
        # reopen the innermost object and append the image field last
        self._head = head[:-2] + b',"image_base64":"'
        self._tail = b'"}}'
        super().__init__(image_b64, content_type="application/json")
        self._size = len(self._head) + len(image_b64) + len(self._tail)

    async def write(self, writer: AbstractStreamWriter) -> None:
        if len(self._value) < JOIN_BELOW:  # one send for the headers and the whole body
            await writer.write(b"".join((self._head, self._value, self._tail)))
            return
        await writer.write(self._head)
        await writer.write(self._value)
        await writer.write(self._tail)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return (self._head + bytes(self._value) + self._tail).decode(encoding, errors)
