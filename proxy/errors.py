"""V2 result codes, V2 task statuses, and the one exception type that carries a code to the edge."""

from enum import IntEnum


class V2Code(IntEnum):
    """The `code` of every V2 reply (spec section 3)."""

    NORMAL = 0
    INTERNAL_ERROR = -1
    INVALID_JSON = 1
    MODEL_NOT_EXIST = 2
    TASK_ID_NOT_EXIST = 3
    INVALID_AUTH = 4
    HOST_UNAVAILABLE = 5
    PARAM_RANGE_OUT_OF_LIMIT = 6
    COST_BALANCE_FAILURE = 7
    SAMPLER_NOT_EXIST = 8
    TIMEOUT = 9
    NOT_SUPPORT = 10


class V2Status(IntEnum):
    """`data.status` of a V2 progress reply (spec section 2)."""

    INITIALIZING = 0
    RUNNING = 1
    SUCCESSFUL = 2
    FAILED = 3
    TIMEOUT = 4

    @property
    def final(self) -> bool:
        return is_final(self)


def is_final(status: int) -> bool:
    """Whether a V2 status (an int, as the status tables give it) is final: it never changes again,
    and a client stops polling. Without making the enum, which per poll is measurable."""
    return status >= V2Status.SUCCESSFUL


class V2Error(Exception):
    """An error the client is told about: raised anywhere, turned into a V2 body at the V2 edge.

    `upstream_status` is the V3 HTTP status when the error came from upstream (for the log line);
    `http_status` is 200 but where V2 itself used another (an expired image is a 404); `feature`,
    the feature unit a strict policy refused (for the audit and the usage store).
    """

    def __init__(self, code: V2Code, msg: str, *, upstream_status: int | None = None,
                 http_status: int = 200, feature: str | None = None) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.upstream_status = upstream_status
        self.http_status = http_status
        self.feature = feature


class StoreUnavailable(V2Error):
    """The task store can't be reached now (Redis down or restarting): code 5, retry. A poll
    answers its task's last known state instead (proxy/v2/last_known.py)."""

    def __init__(self, msg: str = "the task store is unavailable, retry") -> None:
        super().__init__(V2Code.HOST_UNAVAILABLE, msg)
