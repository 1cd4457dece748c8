"""Setting types shared by the proxy's and the emulator's settings."""

from __future__ import annotations

import json
from typing import Annotated

from pydantic import BeforeValidator
from pydantic_settings import NoDecode


def split_commas(value: object) -> object:
    """Lists come from the environment as `a,b,c` (a JSON list works too)."""
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("["):
            return json.loads(value)
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


CommaList = Annotated[list[str], NoDecode, BeforeValidator(split_commas)]
