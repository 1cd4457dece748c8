"""What a V2 body becomes, without calling anyone: the translate preview (POST /_proxy/translate,
`upscale-v2-proxy translate body.json`). Pure: built from the Plan alone."""

from __future__ import annotations

from proxy.translate.plan import V3_NATIVE, Plan
from proxy.v2.image import ImageInfo


def _v3_request(model: str, factor: float, image: str) -> dict:
    return {"extra": {"response_image_type": "png"},
            "request": {"model_name": model, "scale_factor": factor, "image_base64": image}}


def preview(plan: Plan, image: ImageInfo) -> dict:
    source = f"<base64 of the input: {image.format} {image.width}x{image.height}, {image.nbytes} bytes>"
    if plan.rgb_input:
        source = f"<base64 of the input converted to RGB (PNG): {image.width}x{image.height}>"
    requests, steps = [], []
    if plan.rgb_input:
        steps.append("convert the input to RGB, alpha dropped, as V2 did")
    if plan.direct:
        requests.append(_v3_request(plan.direct.model, plan.direct.scale_factor, source))
    elif not plan.branches:
        steps.append("no upscale (upscaler None): the input as it is, in RGB")
    for n, branch in enumerate(plan.branches if not plan.direct else (), start=1):
        name = f"upscaler_{n} {branch.upscaler!r}"
        for k in range(1, branch.passes + 1):
            image_b64 = source if k == 1 else f"<the PNG of pass {k - 1}>"
            requests.append(_v3_request(str(branch.model), V3_NATIVE, image_b64))
        if branch.filter:
            steps.append(f"{name}: a {branch.filter} resize to {plan.scaled[0]}x{plan.scaled[1]}, locally")
        else:
            steps.append(f"{name}: its {branch.passes} V3 pass(es) at 4x, then a LANCZOS resize to "
                         f"{plan.scaled[0]}x{plan.scaled[1]} if the size differs")
        if plan.crop:
            steps.append(f"{name}: centred on a black {plan.crop[0]}x{plan.crop[1]} canvas (crop)")
    if len(plan.branches) == 2 and not plan.direct:
        steps.append(f"Image.blend(upscaler_1, upscaler_2, {plan.blend:g})")
    steps += [f"{f.model} face restoration, visibility {f.visibility:g}" for f in plan.faces]
    return {
        "path": "direct" if plan.direct else "composed",
        "v3_requests": requests,
        "local_steps": steps,
        "output": {"width": plan.output[0], "height": plan.output[1]},
        "warnings": list(plan.warnings),
        "policies": dict(plan.decisions),
    }
