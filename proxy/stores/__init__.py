"""Where composed tasks live: a task store (typed tasks, leases, which are due) and a result store
(bytes: inputs and composed images).

Both are small interfaces; the embedded defaults are SQLite and files under one data directory,
so any number of processes on one machine share them, and a restarted proxy carries on. Replicas
on many machines share Redis instead (`proxy.stores.redis`, imported only when configured).
"""

from proxy.stores.base import ResultStore, TaskRecord, TaskStore
from proxy.stores.files import FileResultStore
from proxy.stores.sqlite import SqliteTaskStore

__all__ = ["FileResultStore", "ResultStore", "SqliteTaskStore", "TaskRecord", "TaskStore"]
