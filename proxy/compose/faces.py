"""Face restoration (GFPGAN, CodeFormer): V2 ran it after the upscale; V3 has no successor.

An interface, so that a local model can be plugged in later. The one implementation today skips
the step (the Plan warns the client, or refuses under the strict policy).
"""

from __future__ import annotations

from typing import Literal, Protocol

from PIL import Image

FaceModel = Literal["gfpgan", "codeformer"]


class FaceRestorer(Protocol):
    available: bool

    def restore(self, image: Image.Image, model: FaceModel, visibility: float,
                weight: float | None) -> Image.Image:
        """The image with faces restored, blended with the input by `visibility` (as V2 did)."""


class SkipFaces:
    """No face model is available: the step is skipped."""

    available = False

    def restore(self, image: Image.Image, model: FaceModel, visibility: float,
                weight: float | None) -> Image.Image:
        return image


NO_FACES = SkipFaces()
