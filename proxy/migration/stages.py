"""The stages a client goes through, the rules that put it in one, and the side each call takes.
Pure: no I/O but reading the rules' file once.

    legacy      V2 serves every call, as sent
    shadow      V2 serves; the translation runs too, in the background, and the two are compared
    canary      `percent` of the calls are served by the translation (V3), the rest by V2
    translated  V3 serves every call (what the proxy does without a legacy V2)

A client's rule is the first of: a change made at run time (the admin API, the dashboard, a
rollback), a rule of the migration file for its fingerprint, one for its label, the file's default.
A canary's choice is made once per task (the task is always polled where it was submitted) and,
by default (`canary_hash = "client"`), once per client: a hash of the fingerprint puts the whole
client in or out of the canary's percent, as Kong's canary does; `"call"` chooses per submission.

The file (UPSCALE_PROXY_MIGRATION_FILE), TOML:

    default = "legacy"          # the stage of clients with no rule (default: legacy)
    canary_hash = "client"      # or "call"

    [[clients]]
    fingerprint = "3f9a0c1d2b4e5f60"   # or: label = "billing team" (UPSCALE_PROXY_CLIENT_LABELS)
    stage = "canary"
    percent = 25
    allow_route = true          # this client may force a side with X-Upscale-Proxy-Route
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Stage = Literal["legacy", "shadow", "canary", "translated"]
Side = Literal["legacy", "v3"]
STAGES: tuple[Stage, ...] = ("legacy", "shadow", "canary", "translated")  # back <- -> forward
SIDES: tuple[Side, ...] = ("legacy", "v3")


@dataclass(frozen=True, slots=True)
class Rule:
    """A client's stage, and where it came from (for the dashboard and the audit)."""

    stage: Stage
    percent: int = 0  # canary: the share of calls the translation serves
    allow_route: bool = False  # X-Upscale-Proxy-Route is honoured for this client
    source: str = "default"  # default | file | admin | rollback | promotion | fall-forward
    why: str = ""
    by: str = ""  # who made a change at run time
    at: float = 0.0  # when (epoch seconds)
    hold_until: float = 0.0  # after a rollback: not promoted again before then

    def to_doc(self) -> dict:
        return {"stage": self.stage, "percent": self.percent, "allow_route": self.allow_route, "source": self.source,
                "why": self.why, "by": self.by, "at": self.at, "hold_until": self.hold_until}

    @classmethod
    def from_doc(cls, doc: Mapping) -> Rule:
        return cls(**{k: doc[k] for k in cls.__dataclass_fields__ if k in doc})


class _ClientRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fingerprint: str | None = Field(None, pattern=r"^[0-9a-f]{16}$")
    label: str | None = Field(None, min_length=1, max_length=200)
    stage: Stage
    percent: int = Field(0, ge=0, le=100)
    allow_route: bool = False

    @model_validator(mode="after")
    def _one_name(self) -> _ClientRule:
        if (self.fingerprint is None) == (self.label is None):
            raise ValueError("give a client's fingerprint or its label, not both")
        return self


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default: Stage = "legacy"
    default_percent: int = Field(0, ge=0, le=100)
    canary_hash: Literal["client", "call"] = "client"
    clients: list[_ClientRule] = []


class MigrationFileError(ValueError):
    """The migration file can't be used; the message says where."""


@dataclass(frozen=True)
class Rules:
    default: Rule = field(default_factory=lambda: Rule("legacy"))
    canary_hash: Literal["client", "call"] = "client"
    by_fingerprint: Mapping[str, Rule] = field(default_factory=dict)
    by_label: Mapping[str, Rule] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None) -> Rules:
        """The rules of the migration file; without one, every client is in `legacy`."""
        if path is None:
            return cls()
        try:
            doc = _File.model_validate(tomllib.loads(path.read_text()))
        except (OSError, UnicodeDecodeError) as e:
            raise MigrationFileError(f"{path}: can't be read ({e})") from None
        except tomllib.TOMLDecodeError as e:
            raise MigrationFileError(f"{path}: not TOML ({e})") from None
        except ValidationError as e:
            where = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise MigrationFileError(f"{path}: {where}") from None
        rules = {c.fingerprint or c.label: Rule(c.stage, c.percent, c.allow_route, "file") for c in doc.clients}
        return cls(Rule(doc.default, doc.default_percent, source="default"), doc.canary_hash,
                   {c.fingerprint: rules[c.fingerprint] for c in doc.clients if c.fingerprint},
                   {c.label: rules[c.label] for c in doc.clients if c.label})

    def rule_for(self, fingerprint: str | None, label: str | None, changes: Mapping[str, Rule]) -> Rule:
        """The client's rule: a change made at run time, else the file's for its fingerprint, for
        its label, else the default."""
        if fingerprint is not None:
            found = changes.get(fingerprint) or self.by_fingerprint.get(fingerprint)
            if found is not None:
                return found
        if label is not None and label in self.by_label:
            return self.by_label[label]
        return self.default


def bucket(fingerprint: str | None) -> int:
    """The client's bucket, 0 to 99: the same on every replica, and for every call."""
    digest = hashlib.sha256((fingerprint or "").encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100


def side_of(rule: Rule, fingerprint: str | None, canary_hash: str, draw: float) -> Side:
    """The side a new submission goes to; `draw`, a random number in [0, 1) for a per-call canary."""
    if rule.stage == "translated":
        return "v3"
    if rule.stage == "canary":
        chosen = bucket(fingerprint) if canary_hash == "client" else int(draw * 100)
        return "v3" if chosen < rule.percent else "legacy"
    return "legacy"


def step_back(stage: Stage) -> Stage:
    """The stage before: where a rollback sends a client."""
    return STAGES[max(STAGES.index(stage) - 1, 0)]


def step_forward(stage: Stage) -> Stage:
    return STAGES[min(STAGES.index(stage) + 1, len(STAGES) - 1)]
