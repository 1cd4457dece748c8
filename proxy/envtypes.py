"""Setting types shared by the proxy's and the emulator's settings.

A value that can't be read is a ValueError naming what is wrong with it, so that pydantic reports
it against the setting, and the boot stops naming the variable (proxy/cli.py).
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Annotated, TypeVar

from pydantic import BeforeValidator
from pydantic_settings import NoDecode

T = TypeVar("T")
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


def from_json(value: object) -> object:
    """Structured settings come from the environment as JSON."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON: {e.msg} at character {e.pos}") from None
    return value


def split_commas(value: object) -> object:
    """Lists come from the environment as `a,b,c` (a JSON list works too)."""
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("["):
            return from_json(value)
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def host_name(value: str) -> str:
    """A DNS name or an IP address, as a listening address is given."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if len(value) > 253 or not _HOST_NAME.fullmatch(value):
            raise ValueError("not a host name or an IP address") from None
    return value


CommaList = Annotated[list[str], NoDecode, BeforeValidator(split_commas)]
JsonList = Annotated[list[T], NoDecode, BeforeValidator(from_json)]  # JsonList[Model]
JsonDict = Annotated[dict[str, str], NoDecode, BeforeValidator(from_json)]  # a JSON object of strings
