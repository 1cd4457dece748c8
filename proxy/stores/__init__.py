"""Where composed tasks live between polls: a plan store (task state) and a result store (bytes).

Both are small interfaces; the embedded defaults are SQLite and files under one data directory,
so any number of processes on one machine share them, and a restarted proxy carries on.
"""

from proxy.stores.base import PlanStore, ResultStore, StoredTask
from proxy.stores.files import FileResultStore
from proxy.stores.sqlite import SqlitePlanStore

__all__ = ["FileResultStore", "PlanStore", "ResultStore", "SqlitePlanStore", "StoredTask"]
