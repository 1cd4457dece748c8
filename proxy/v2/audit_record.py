"""One V2 call as its audit event tells it: a typed record, rendered as `v2.deprecated_call`.

The edge fills in who called and how the call ended; handlers set what the call used and where it
went, as attributes. `proxy.audit` reads these events back into the usage report, so the event's
keys and values are a contract: rename nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

# attributes that appear in the event only once something has set them
_WHEN_SET = ("fields", "features", "warnings", "task_id", "v3_task_ids", "v3_jobs", "upstream_status",
             "poll_cache", "ride_through", "stage", "served_by", "msg")


@dataclass(slots=True)
class AuditRecord:
    # the edge, when the call arrives
    method: str
    path: str
    endpoint: str | None  # the route's name: upscale, progress, images; None for an unknown path
    user_agent: str
    started: float  # perf_counter seconds
    fingerprint: str | None = None  # HMAC of the key, never the key; None when no key was sent
    # handlers
    fields: tuple[str, ...] | None = None  # the V2 fields present in the body
    features: dict[str, str] | None = None  # V2 feature V3 lacks -> the policy applied
    warnings: list[str] | None = None
    path_taken: str | None = None  # direct | composed; the edge: refused | brownout
    task_id: str | None = None
    v3_task_ids: list[str] | None = None  # a composed task's V3 jobs
    v3_jobs: int | None = None  # the V3 jobs an accepted upscale costs, all its passes counted
    shape: str | None = None  # the body's fields but the image, and the image's shape (usage store only)
    upstream_status: int | None = None  # V3's HTTP status; None when no call was made
    poll_cache: str | None = None  # a direct poll: miss | shared | hit (proxy/v2/poll_cache.py)
    # a poll that could not reach V3 or the store: last_known | unseen | past_grace (proxy/v2/last_known.py)
    ride_through: str | None = None
    # with a legacy V2 (proxy/migration): the client's stage (or forced, v2-gone), and the side that served
    stage: str | None = None
    served_by: str | None = None  # legacy; None: the translation (V3), as without a legacy V2
    task_status: int | None = None  # a poll's answer: the task's V2 status (not in the event)
    # the edge, when the call ends
    v2_code: int = 0
    msg: str | None = None  # what the client was told, when the call failed

    @property
    def final_path(self) -> str:
        """The path taken; a call that failed before choosing one was refused."""
        return self.path_taken or ("refused" if self.v2_code else "direct")

    def event(self, now: float) -> dict:
        """The event's fields, `now` a perf_counter reading at the end of the call."""
        doc = {
            "method": self.method, "path": self.path, "endpoint": self.endpoint, "fingerprint": self.fingerprint,
            "user_agent": self.user_agent, "path_taken": self.final_path, "v2_code": self.v2_code,
            "latency_ms": round((now - self.started) * 1000, 2),
        }
        for name in _WHEN_SET:
            value = getattr(self, name)
            if value is not None:
                doc[name] = value
        return doc
