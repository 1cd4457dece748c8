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
    shadow.py   shadow comparisons: the translation run beside V2 in the background, within a budget
    compare.py  two results compared as people would: outcome, size and mode, PSNR and SSIM, heat map
    health.py   when a client steps back (failures, mismatches) or forward (matches): pure
    service.py  what follows each call and comparison: counted, kept, judged, stages changed
    view.py     what the dashboard's migration views and GET /_proxy/migration read
"""
