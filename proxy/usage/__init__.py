"""Usage auditing an operator can run (DESIGN.md, "The operator's side"): who still calls V2, how
often, with which features, and who has moved to V3.

    tally.py     the hot path: each call adds to counters in memory, per client and hour
    stores.py    where the counts go, every second: SQLite in the data directory, or Redis (replicas)
    readiness.py each client's readiness and deadline, a pure function of its counts and the clock
    view.py      what the dashboard, /_proxy/usage (JSON, CSV) and `audit --store` read: one place
    snippets.py  a V2 body's exact V3 request as curl, Python, JavaScript and Go; a client's notice

A client is a key fingerprint (never the key), or "unidentified" for calls without a key. Counts
are kept per hour, not per call: the store's size follows clients x hours, not traffic.
"""
