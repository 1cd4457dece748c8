"""upscale-v2-proxy serve | emulator | translate | audit | guide | fingerprint

Every option can also be set by environment variable (UPSCALE_PROXY_*, emulator:
UPSCALE_PROXY_EMULATOR_*, legacy V2 emulator: UPSCALE_PROXY_LEGACY_*); an option given on the
command line wins.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import os
import re
import signal
import sys
from functools import partial

import structlog
from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsError

from proxy import __version__, logs
from proxy.mappings import MappingsError
from proxy.settings import Settings

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
from proxy.serving import Drain, Workers, announced_url, run


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="upscale-v2-proxy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"upscale-v2-proxy {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the V2 proxy")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080)")
    serve.add_argument("--upstream", help="V3 base URL (default https://api.novita.ai)")
    serve.add_argument("--emulate-v3", action="store_true", default=None,
                       help="run the built-in V3 emulator in this process and use it as the upstream")
    serve.add_argument("--emulator-port", type=int, dest="emulator_port",
                       help="port of the built-in emulator with --emulate-v3 (default 9090)")
    serve.add_argument("--emulate-v2", action="store_true", default=None,
                       help="run the legacy V2 emulator in this process and use it as the V2 upstream")
    serve.add_argument("--legacy-port", type=int, dest="legacy_port",
                       help="port of the legacy V2 emulator with --emulate-v2 (default 9091)")
    serve.add_argument("--workers", type=int, default=1, metavar="N",
                       help="processes serving one port (SO_REUSEPORT), sharing the data directory; "
                            "0: one per CPU (default 1)")
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # a worker of --workers

    emu = sub.add_parser("emulator", help="run the V3 emulator alone (or the legacy V2 one)")
    emu.add_argument("--legacy-v2", action="store_true",
                     help="emulate the legacy V2 API instead (settings UPSCALE_PROXY_LEGACY_*)")
    emu.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    emu.add_argument("--port", type=int, help="port to listen on (default 9090, 9091 with --legacy-v2)")
    emu.add_argument("--queue-delay", type=float, help="seconds a task stays QUEUED")
    emu.add_argument("--process-delay", type=float, help="seconds a task stays PROCESSING")
    emu.add_argument("--quiet-env", action="store_true", help=argparse.SUPPRESS)  # serve --workers's emulator

    for command in (serve, emu):
        command.add_argument("--log-format", choices=["auto", "json", "console"])
        command.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    tr = sub.add_parser("translate", help="show what a V2 upscale body becomes in V3 (no upstream call)")
    tr.add_argument("file", help="a V2 upscale body (JSON), or - for standard input")
    audit = sub.add_parser("audit", help="per-client report of V2 usage, from the proxy's JSON log or its usage store")
    audit.add_argument("file", nargs="?", default="-", help="a log file, or - for standard input (default)")
    audit.add_argument("--json", action="store_true", help="machine-readable output")
    audit.add_argument("--store", action="store_true", help="read the usage store the proxy writes (SQLite in "
                       "UPSCALE_PROXY_DATA_DIR, or Redis at UPSCALE_PROXY_REDIS_URL) instead of a log")
    audit.add_argument("--days", type=int, default=30, help="with --store: the period, in days (default 30)")
    gd = sub.add_parser("guide", help="print the V2 -> V3 migration guide (Markdown)")
    gd.add_argument("--features", action="store_true",
                    help="print only the table of V2 features V3 lacks, as the README shows it")
    sub.add_parser("fingerprint", help="read a key on standard input, print its fingerprint (for brownout "
                   "allow-lists), with the secret the server uses")
    return p


def _open(name: str):
    """A binary file to read: stdin for `-`; a file that can't be opened exits with its reason."""
    if name == "-":
        return sys.stdin.buffer
    try:
        return open(name, "rb")  # noqa: SIM115 (closed by the caller's `with`)
    except OSError as e:
        raise SystemExit(f"upscale-v2-proxy: {e}") from None


def _print_json(doc: object) -> None:
    import orjson

    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")


def _offline(command: str, args: dict) -> None:
    """translate | audit | guide: no server, just the tables (and the policies, for translate)."""
    from proxy import audit, guide, mappings

    tables = mappings.load()
    if command == "guide":
        sys.stdout.write(guide.feature_table() if args["features"] else guide.guide(tables))
    elif command == "audit":
        if args["store"]:
            rows = audit.from_usage(asyncio.run(_stored_usage(args["days"])))
        else:
            with _open(args["file"]) as source:
                rows = audit.report(audit.read_events(source))
        if args["json"]:
            _print_json(rows)
        else:
            sys.stdout.write(audit.render(rows))
    else:
        with _open(args["file"]) as source:
            _translate(source.read(), tables)


async def _stored_usage(days: int) -> list[dict]:
    """The usage store's clients over the last `days`, as the settings in the environment find it."""
    from proxy.usage import view
    from proxy.usage.stores import open_store

    settings = _settings(Settings, {})
    try:
        filters = view.Filters.from_query({"days": str(days)})
    except view.BadFilter as e:
        raise SystemExit(f"upscale-v2-proxy: --{e}") from None
    async with open_store(settings) as (store, ctx):
        return (await view.clients(store, ctx, filters))["clients"]


def _translate(body: bytes, tables) -> None:
    """The translate preview, as POST /_proxy/translate answers it, with this environment's policies."""
    from proxy.errors import V2Error
    from proxy.v2.translation import Translator

    translator = Translator.from_settings(tables, _settings(Settings, {}))
    try:
        doc = translator.preview(body)
    except V2Error as e:
        print(f"upscale-v2-proxy: the proxy would answer code {int(e.code)}: {e.msg}", file=sys.stderr)
        raise SystemExit(1) from None
    _print_json(doc)


def _fingerprint() -> None:
    """A key on stdin -> its fingerprint, with the server's secret: UPSCALE_PROXY_FINGERPRINT_SECRET,
    else the secret the server made in the data directory. Never makes one (the server would not
    find it, or would make another), never echoes the key."""
    from proxy.fingerprint import fingerprint, load_secret

    settings = _settings(Settings, {})
    configured = settings.fingerprint_secret and settings.fingerprint_secret.get_secret_value()
    path = settings.data_dir / "fingerprint.secret"
    if not configured and not path.is_file():
        print(f"upscale-v2-proxy: no fingerprint secret: UPSCALE_PROXY_FINGERPRINT_SECRET is not set and there "
              f"is no {path} (UPSCALE_PROXY_DATA_DIR={settings.data_dir}). The server makes one at its "
              "first start: run this where it runs, with the same environment", file=sys.stderr)
        raise SystemExit(2)
    line = sys.stdin.readline().strip()
    scheme, _, rest = line.partition(" ")
    key = rest.strip() if scheme.lower() == "bearer" else line  # as the proxy reads an Authorization header
    if not re.fullmatch(r"[\x21-\x7e]+", key):
        print("upscale-v2-proxy: no key on standard input (one line: the key, printable ASCII, no spaces)",
              file=sys.stderr)
        raise SystemExit(2)
    try:
        secret = load_secret(configured, settings.data_dir)
    except OSError as e:
        raise SystemExit(f"upscale-v2-proxy: cannot read the fingerprint secret: {e}") from None
    print(fingerprint(key, secret))


def unknown_variables(environ: dict[str, str] | None = None) -> list[tuple[str, str | None]]:
    """UPSCALE_PROXY_* variables no setting reads (a typo is otherwise ignored silently): each with
    the closest name there is, or None."""
    from proxy.emulator.legacy_settings import LegacySettings
    from proxy.emulator.settings import EmulatorSettings

    known: set[str] = set()
    for cls in (Settings, EmulatorSettings, LegacySettings):
        prefix = cls.model_config["env_prefix"]
        known.update(f"{prefix}{name}".upper() for name in cls.model_fields)
    found = []
    for name in sorted(environ if environ is not None else os.environ):
        upper = name.upper()
        if upper.startswith("UPSCALE_PROXY_") and upper not in known:
            close = difflib.get_close_matches(upper, known, n=1, cutoff=0.6)
            found.append((name, close[0] if close else None))
    return found


def _warn_unknown_variables() -> None:
    log = structlog.get_logger("proxy")
    for name, close in unknown_variables():
        log.warning("unknown setting, ignored", variable=name, **({"did_you_mean": close} if close else {}))


def _settings(cls: type[BaseSettings], values: dict) -> BaseSettings:
    """Build settings from the environment and the given options; exit 2 naming a bad setting."""
    prefix = cls.model_config["env_prefix"]
    try:
        return cls(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as e:
        lines = [_setting_error(cls, prefix, err) for err in e.errors(include_url=False)]
    except SettingsError as e:  # a value pydantic-settings could not even decode (JSON, ...)
        field = re.search(r'field "(\w+)"', str(e))
        name = f"{prefix}{field[1].upper()}" if field else "a setting"
        lines = [f"  {name}: can't be read: {e.__cause__ or e}"]
    print(f"upscale-v2-proxy: invalid configuration ({prefix}* or the matching option):", file=sys.stderr)
    for line in lines:
        print(line, file=sys.stderr)
    raise SystemExit(2) from None


def _setting_error(cls: type[BaseSettings], prefix: str, err) -> str:
    if not err["loc"]:  # a rule across settings: its message names them
        return f"  {err['msg'].removeprefix('Value error, ')}"
    name = str(err["loc"][0])
    where = ".".join(map(str, err["loc"][1:]))
    field = cls.model_fields.get(name)
    secret = field is not None and "SecretStr" in str(field.annotation)
    got = "" if secret else f" (got {err.get('input')!r})"  # a secret is never echoed
    return f"  {prefix}{name.upper()}{' at ' + where if where else ''}: {err['msg'].removeprefix('Value error, ')}{got}"


def main(argv: list[str] | None = None) -> None:
    args = vars(_parser().parse_args(argv))
    command = args.pop("command")
    if command in ("translate", "audit", "guide"):
        return _offline(command, args)
    if command == "fingerprint":
        return _fingerprint()
    log_opts = {"log_format": args.pop("log_format"), "log_level": args.pop("log_level")}
    log = structlog.get_logger("proxy")

    if command == "emulator":
        from proxy.emulator import EmulatorSettings, LegacySettings, create_emulator_app, create_legacy_app

        quiet_env, legacy = args.pop("quiet_env"), args.pop("legacy_v2")
        emulator = _settings(LegacySettings if legacy else EmulatorSettings, args)
        logs.configure(log_opts["log_format"] or "auto", log_opts["log_level"] or "info")
        if not quiet_env:  # serve --workers has said it
            _warn_unknown_variables()
        app = create_legacy_app(emulator) if legacy else create_emulator_app(emulator)
        app.cleanup_ctx.append(logs.flush_periodically)
        run(app, emulator.host, emulator.port, lambda port: log.info(
            "legacy V2 emulator listening" if legacy else "emulator listening",
            url=announced_url(emulator.host, port)))
        return

    emulator_port, legacy_port = args.pop("emulator_port"), args.pop("legacy_port")
    workers, reuse_port = args.pop("workers"), args.pop("reuse_port")
    if workers < 0:
        print("upscale-v2-proxy: --workers is a number of processes, 0 for one per CPU", file=sys.stderr)
        raise SystemExit(2)
    workers = workers or os.cpu_count() or 1
    settings = _settings(Settings, {**args, **log_opts})
    emulator = None
    if settings.emulate_v3:  # the emulator's code is loaded only when it runs
        from proxy.emulator import EmulatorSettings

        emulator = _settings(EmulatorSettings, {"port": emulator_port})
    legacy = None
    if settings.emulate_v2:
        if workers > 1:  # each worker would start its own V2, with its own tasks, on one port
            print("upscale-v2-proxy: --emulate-v2 runs in one process: with --workers, run "
                  "`upscale-v2-proxy emulator --legacy-v2` and set UPSCALE_PROXY_V2_UPSTREAM to it", file=sys.stderr)
            raise SystemExit(2)
        from proxy.emulator import LegacySettings

        legacy = _settings(LegacySettings, {"port": legacy_port})
    logs.configure(settings.log_format, settings.log_level, shared=reuse_port or workers > 1)
    if not reuse_port:  # a worker's parent has said it
        _warn_unknown_variables()
    from proxy.dashboard import auth as admin

    settings, made_token = admin.with_token(settings)  # a worker has its parent's, in its environment

    def announce_dashboard(port: int) -> None:
        if made_token:
            host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(settings.host, settings.host)
            admin.announce(admin.dashboard_url(announced_url(host, port), made_token))

    if workers > 1:
        raise SystemExit(Workers(settings, emulator, workers, announce_dashboard).run())
    from proxy.app import create_app, start_draining

    try:
        app = create_app(settings, emulator, legacy)
    except MappingsError as e:
        print(f"upscale-v2-proxy: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    def listening(port: int) -> None:
        log.info("proxy listening", url=announced_url(settings.host, port),
                 upstream="emulator" if settings.emulate_v3 else settings.upstream)
        announce_dashboard(port)

    run(app, settings.host, settings.port, listening,
        Drain(settings.drain_delay, settings.shutdown_grace, partial(start_draining, app)), reuse_port=reuse_port)
