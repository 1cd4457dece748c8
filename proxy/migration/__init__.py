"""Gradual migration (DESIGN.md, "The operator's side"): while the legacy V2 still runs
(UPSCALE_PROXY_V2_UPSTREAM), each client has a stage, and each call is served by the side its
stage says.

    stages.py   the stages, the rules (a TOML file, and changes made at run time), which rule a
                client falls under and which side one of its calls goes to: pure
    store.py    what replicas share: the stages set at run time, which side took each task, and
                whether V2 is gone (SQLite in the data directory, or Redis)
    router.py   the app's view of it: the rules and the store's changes (re-read every second), the
                side of each submission and poll, the changes and their audit events
    legacy.py   the legacy side: a V2 call forwarded to V2 as sent, its reply passed back
"""
