"""What a V2 body becomes, without calling anyone: the translate preview (POST /_proxy/translate,
`upscale-v2-proxy translate body.json`). Pure: the Plan describes itself."""

from __future__ import annotations

from proxy.translate.plan import Plan
from proxy.translate.steps import V3Job
from proxy.v2.image import ImageInfo


def _v3_request(job: V3Job, image: str) -> dict:
    return {"extra": {"response_image_type": "png"},
            "request": {"model_name": job.model, "scale_factor": job.scale_factor, "image_base64": image}}


def preview(plan: Plan, image: ImageInfo) -> dict:
    source = f"<base64 of the input: {image.format} {image.width}x{image.height}, {image.nbytes} bytes>"
    if plan.v3_input == "pixels":
        source = f"<base64 of the input's pixels as an RGB PNG: {plan.input_size[0]}x{plan.input_size[1]}>"
    chains = [(plan.direct,)] if plan.direct else [b.v3_jobs for b in plan.branches]
    requests = [_v3_request(job, source if n == 0 else f"<the PNG of V3 job {n} of this branch>")
                for chain in chains for n, job in enumerate(chain)]
    return {
        "path": plan.path,
        "a1111_profile": plan.profile,
        "v3_requests": requests,
        "local_steps": plan.describe(),
        "output": {"width": plan.output_size[0], "height": plan.output_size[1]},
        "warnings": list(plan.warnings),
        "policies": dict(plan.decisions),
    }
