"""Loads and validates the translation tables in `mappings/` (TOML).

A table that names an unknown V3 model, V2 code or filter stops the boot with a message naming the
file and the entry: the tables are data, but they are checked like code.
"""

from __future__ import annotations

import tomllib
from functools import cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from proxy.errors import V2Code

V3Model = Literal["RealESRGAN_x4plus_anime_6B", "RealESRNet_x4plus", "4x-UltraSharp"]
V3_MODELS: tuple[str, ...] = V3Model.__args__


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Upscaler(_Strict):
    """What runs one V2 upscaler name: a V3 model, or a local Pillow filter, or nothing."""

    v3_model: V3Model | None = None
    local: Literal["LANCZOS", "NEAREST", "none"] | None = None
    exact: bool
    note: str

    @model_validator(mode="after")
    def _one_engine(self) -> Upscaler:
        if (self.v3_model is None) == (self.local is None):
            raise ValueError("set exactly one of v3_model and local")
        return self


class UpscalerTable(_Strict):
    default: str
    upscalers: dict[str, Upscaler]

    @model_validator(mode="after")
    def _default_is_listed(self) -> UpscalerTable:
        if self.default not in self.upscalers:
            raise ValueError(f"default upscaler {self.default!r} is not listed")
        return self


class ErrorFallback(_Strict):
    client_error: V2Code
    server_error: V2Code


class ErrorTable(_Strict):
    reasons: dict[str, V2Code]
    statuses: dict[int, V2Code]
    fallback: ErrorFallback
    notes: dict[int, str] = {}


class Field(_Strict):
    """One V2 field and its V3 successor, for the migration guide."""

    fate: Literal["direct", "emulated", "approximated", "unsupported"]
    v3: str
    note: str
    before: str
    after: str


class Mappings(_Strict):
    upscalers: UpscalerTable
    errors: ErrorTable
    task_status: dict[str, Literal[0, 1, 2, 3, 4]]
    fields: dict[Literal["upscale", "progress", "errors"], dict[str, Field]]


class MappingsError(Exception):
    """A translation table is missing or invalid; the message names the file and the entry."""


def default_dir() -> Path:
    """`proxy/tables` inside an installed wheel, else the repository's top-level `mappings/`."""
    packaged = Path(__file__).parent / "tables"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "mappings"


def _read(folder: Path, name: str) -> dict:
    path = folder / f"{name}.toml"
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise MappingsError(f"{path}: {e}") from e


@cache
def load(folder: Path | None = None) -> Mappings:
    folder = folder or default_dir()
    raw = {name: _read(folder, name) for name in ("upscalers", "errors", "task_status", "fields")}
    try:
        return Mappings.model_validate(raw)
    except ValidationError as e:
        lines = [f"{folder}/{'.'.join(map(str, err['loc'][:1]))}.toml: "
                 f"{'.'.join(map(str, err['loc'][1:]))}: {err['msg']}" for err in e.errors()]
        raise MappingsError("invalid translation tables:\n  " + "\n  ".join(lines)) from None
