"""The V2 upscale body (spec section 1), every field but `image`, which is handled as raw bytes.

Legacy SDKs send every field, nulls included; null means "not set". Types are checked strictly
(a string is never taken for a number) except that an integral float is accepted for an int.
Each resize mode reads only its own fields, so only those are range-checked: real clients send
`upscaling_resize_w: 0` in mode 0 and `upscaling_resize: 4` in mode 1 (spec 7.1).
"""

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from proxy.errors import V2Code, V2Error


def _integral_float(value: object) -> object:
    return int(value) if isinstance(value, float) and value.is_integer() else value


Int = Annotated[int, BeforeValidator(_integral_float)]
Unit = Annotated[float, Field(ge=0, le=1)]

# pydantic error types that mean "a value out of its range" (V2 code 6); anything else is code 1
RANGE_ERRORS = frozenset({
    "greater_than", "greater_than_equal", "less_than", "less_than_equal", "literal_error",
    "finite_number",
})


class V2UpscaleOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    upscaler_1: str | None = None
    resize_mode: Annotated[Int, Field(ge=0, le=1)] | None = None
    upscaling_resize: Annotated[float, Field(allow_inf_nan=False)] | None = None  # mode 0
    upscaling_resize_w: Int | None = None  # mode 1
    upscaling_resize_h: Int | None = None  # mode 1
    upscaling_crop: bool | None = None
    upscaler_2: str | None = None
    extras_upscaler_2_visibility: Unit | None = None
    gfpgan_visibility: Unit | None = None
    codeformer_visibility: Unit | None = None
    codeformer_weight: Unit | None = None
    img_expire_ttl: Annotated[Int, Field(ge=0, le=604800)] | None = None


V2_FIELDS = ("image", *V2UpscaleOptions.model_fields)


def validate_options(doc: dict) -> V2UpscaleOptions:
    """The V2 fields of a parsed body, or a V2Error naming the first bad field."""
    try:
        options = V2UpscaleOptions.model_validate(doc)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        field = str(err["loc"][0]) if err["loc"] else "body"
        code = V2Code.PARAM_RANGE_OUT_OF_LIMIT if err["type"] in RANGE_ERRORS else V2Code.INVALID_JSON
        raise V2Error(code, f"{field}: {err['msg']}") from None
    _check_mode_fields(options)
    return options


def _check_mode_fields(o: V2UpscaleOptions) -> None:
    if o.resize_mode == 1:
        for field in ("upscaling_resize_w", "upscaling_resize_h"):
            value = getattr(o, field)
            if value is None:
                raise V2Error(V2Code.INVALID_JSON, f"{field}: required when resize_mode is 1")
            if value < 1:
                raise V2Error(V2Code.PARAM_RANGE_OUT_OF_LIMIT, f"{field}: Input should be greater than or equal to 1")
    elif o.upscaling_resize is not None and o.upscaling_resize <= 0:
        raise V2Error(V2Code.PARAM_RANGE_OUT_OF_LIMIT, "upscaling_resize: Input should be greater than 0")
