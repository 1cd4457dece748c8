"""A V2 upscale body -> the Plan for it: the one place the handler, the translate preview and the
`translate` command turn a body into decisions, with the settings that shape them."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import lru_cache

import orjson

from proxy.mappings import Mappings
from proxy.settings import Settings
from proxy.translate.features import REGISTRY, Policy, default_policies
from proxy.translate.plan import Plan
from proxy.translate.planner import plan_upscale
from proxy.translate.preview import preview
from proxy.translate.profiles import DEFAULT_PROFILE, PROFILES, A1111Profile
from proxy.v2.body import split_image
from proxy.v2.image import ImageInfo, probe
from proxy.v2.models import V2_FIELDS, V2UpscaleOptions, validate_options

PLANS_KEPT = 1024  # distinct (body fields, image shape) pairs whose Plan is kept
# what the planner may read of an image: all of ImageInfo but its size in bytes
_SHAPE = tuple(f.name for f in fields(ImageInfo) if f.name != "nbytes")


@dataclass(frozen=True, slots=True)
class Translation:
    image: ImageInfo
    image_b64: memoryview | bytes  # the base64 to forward (repaired if V2 leniency needed it)
    plan: Plan
    fields: tuple[str, ...]  # the V2 fields the body sets, for the audit event (kept: never changed)
    shape: str  # the body but its image, and the image's shape, as JSON: the usage store's "body shape"


@dataclass(frozen=True)
class Translator:
    mappings: Mappings
    policies: Mapping[str, Policy] = field(default_factory=default_policies)
    profile: A1111Profile = PROFILES[DEFAULT_PROFILE]
    faces_available: bool = False
    # Plans are pure functions of the body's fields, the image's shape and the settings here, and
    # legacy clients send the same fields again and again: each pair is planned once
    _plans: OrderedDict[tuple, tuple[Plan, str]] = field(
        default_factory=OrderedDict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for unit in REGISTRY:  # Settings names the variable; this catches any other caller
            if self.policies.get(unit.name, unit.default) not in unit.allowed:
                raise ValueError(f"{type(unit).__name__} allows {', '.join(unit.allowed)}, "
                                 f"not {self.policies[unit.name]!r}")

    @classmethod
    def from_settings(cls, mappings: Mappings, settings: Settings) -> Translator:
        return cls(mappings, settings.policies(), settings.profile,
                   faces_available=settings.face_restorer_url is not None)

    def translate(self, doc: dict, image_b64: memoryview | bytes, head: bytes | None = None) -> Translation:
        """The body's other fields and its image text (see `v2.body.split_image`, which gives the
        image's decoded `head` when it has validated it) -> a Translation, or a V2Error naming the
        first thing wrong."""
        doc_key = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
        options, sent = _options(doc_key)
        image, image_b64 = probe(image_b64, head)
        key = (doc_key, *(getattr(image, name) for name in _SHAPE))
        kept = self._plans.get(key)
        if kept is None:
            kept = self._plans[key] = (plan_upscale(options, image, self.mappings, self.policies, self.profile,
                                                    self.faces_available), shape_of(doc_key, image))
            if len(self._plans) > PLANS_KEPT:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return Translation(image, image_b64, kept[0], sent, kept[1])

    def preview_shape(self, shape: str) -> dict:
        """The translate preview of a body shape (`shape_of`), as of the settings now: what a client
        that sent such bodies would send V3 instead. A V2Error if the shape is refused now."""
        doc = orjson.loads(shape)
        image = ImageInfo(**doc["image"], nbytes=0)
        options, _ = _options(orjson.dumps(doc["fields"], option=orjson.OPT_SORT_KEYS))
        plan = plan_upscale(options, image, self.mappings, self.policies, self.profile, self.faces_available)
        return preview(plan, image)

    def preview(self, body: bytes) -> dict:
        """The translate preview of a whole body (POST /_proxy/translate, `translate`)."""
        translation = self.translate(*split_image(body))
        return preview(translation.plan, translation.image)


def shape_of(doc_key: bytes, image: ImageInfo) -> str:
    """A body's shape: its fields but the image (canonical JSON, as `doc_key` is), and what the
    planner reads of the image (not its bytes): enough to plan it again, nothing of its pixels."""
    return orjson.dumps({"fields": orjson.Fragment(doc_key),
                         "image": {name: getattr(image, name) for name in _SHAPE}}).decode()


@lru_cache(maxsize=PLANS_KEPT)
def _options(doc_key: bytes) -> tuple[V2UpscaleOptions, tuple[str, ...]]:
    """A body's fields (but its image), validated, and the names of those it sets; a V2Error for a
    bad one, which is not kept. Keyed by the fields as canonical JSON: the same text, the same
    answer."""
    doc = orjson.loads(doc_key)
    return validate_options(doc), fields_sent(doc)


def fields_sent(doc: dict) -> tuple[str, ...]:
    """The V2 fields a body sets (null is "not set"), for the audit event."""
    return tuple(name for name in V2_FIELDS if doc.get(name) is not None)
