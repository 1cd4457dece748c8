"""A V2 upscale body -> the Plan for it: the one place the handler, the translate preview and the
`translate` command turn a body into decisions, with the settings that shape them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from proxy.mappings import Mappings
from proxy.settings import Settings
from proxy.translate.features import REGISTRY, Policy, default_policies
from proxy.translate.plan import Plan
from proxy.translate.planner import plan_upscale
from proxy.translate.preview import preview
from proxy.translate.profiles import DEFAULT_PROFILE, PROFILES, A1111Profile
from proxy.v2.body import split_image
from proxy.v2.image import ImageInfo, probe
from proxy.v2.models import V2_FIELDS, validate_options


@dataclass(frozen=True, slots=True)
class Translation:
    image: ImageInfo
    image_b64: memoryview | bytes  # the base64 to forward (repaired if V2 leniency needed it)
    plan: Plan


@dataclass(frozen=True)
class Translator:
    mappings: Mappings
    policies: Mapping[str, Policy] = field(default_factory=default_policies)
    profile: A1111Profile = PROFILES[DEFAULT_PROFILE]
    faces_available: bool = False

    def __post_init__(self) -> None:
        for unit in REGISTRY:  # Settings names the variable; this catches any other caller
            if self.policies.get(unit.name, unit.default) not in unit.allowed:
                raise ValueError(f"{type(unit).__name__} allows {', '.join(unit.allowed)}, "
                                 f"not {self.policies[unit.name]!r}")

    @classmethod
    def from_settings(cls, mappings: Mappings, settings: Settings) -> Translator:
        return cls(mappings, settings.policies(), settings.profile,
                   faces_available=settings.face_restorer_url is not None)

    def translate(self, doc: dict, image_b64: memoryview | bytes) -> Translation:
        """The body's other fields and its image text (see `v2.body.split_image`) -> a Translation,
        or a V2Error naming the first thing wrong."""
        options = validate_options(doc)
        image, image_b64 = probe(image_b64)
        plan = plan_upscale(options, image, self.mappings, self.policies, self.profile, self.faces_available)
        return Translation(image, image_b64, plan)

    def preview(self, body: bytes) -> dict:
        """The translate preview of a whole body (POST /_proxy/translate, `translate`)."""
        translation = self.translate(*split_image(body))
        return preview(translation.plan, translation.image)


def fields_sent(doc: dict) -> list[str]:
    """The V2 fields a body sets (null is "not set"), for the audit event."""
    return [name for name in V2_FIELDS if doc.get(name) is not None]
