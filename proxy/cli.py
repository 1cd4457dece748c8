"""upscale-v2-proxy serve | emulator | translate | audit | guide

Every option can also be set by environment variable (UPSCALE_PROXY_*, emulator:
UPSCALE_PROXY_EMULATOR_*); an option given on the command line wins.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import structlog
from aiohttp import web
from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsError

from proxy import logs
from proxy.mappings import MappingsError
from proxy.settings import Settings

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="upscale-v2-proxy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the V2 proxy")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080)")
    serve.add_argument("--upstream", help="V3 base URL (default https://api.novita.ai)")
    serve.add_argument("--emulate-v3", action="store_true", default=None,
                       help="run the built-in V3 emulator in this process and use it as the upstream")
    serve.add_argument("--emulator-port", type=int, dest="emulator_port",
                       help="port of the built-in emulator with --emulate-v3 (default 9090)")

    emu = sub.add_parser("emulator", help="run the V3 emulator alone")
    emu.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    emu.add_argument("--port", type=int, help="port to listen on (default 9090)")
    emu.add_argument("--queue-delay", type=float, help="seconds a task stays QUEUED")
    emu.add_argument("--process-delay", type=float, help="seconds a task stays PROCESSING")

    for command in (serve, emu):
        command.add_argument("--log-format", choices=["auto", "json", "console"])
        command.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    tr = sub.add_parser("translate", help="show what a V2 upscale body becomes in V3 (no upstream call)")
    tr.add_argument("file", help="a V2 upscale body (JSON), or - for standard input")
    audit = sub.add_parser("audit", help="per-client report of V2 usage, from the proxy's JSON log")
    audit.add_argument("file", nargs="?", default="-", help="a log file, or - for standard input (default)")
    audit.add_argument("--json", action="store_true", help="machine-readable output")
    gd = sub.add_parser("guide", help="print the V2 -> V3 migration guide (Markdown)")
    gd.add_argument("--features", action="store_true",
                    help="print only the table of V2 features V3 lacks, as the README shows it")
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
        with _open(args["file"]) as source:
            rows = audit.report(audit.read_events(source))
        if args["json"]:
            _print_json(rows)
        else:
            sys.stdout.write(audit.render(rows))
    else:
        with _open(args["file"]) as source:
            _translate(source.read(), tables)


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


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main(argv: list[str] | None = None) -> None:
    args = vars(_parser().parse_args(argv))
    command = args.pop("command")
    if command in ("translate", "audit", "guide"):
        return _offline(command, args)
    log_opts = {"log_format": args.pop("log_format"), "log_level": args.pop("log_level")}
    log = structlog.get_logger("proxy")

    if command == "emulator":
        from proxy.emulator import EmulatorSettings, create_emulator_app

        emulator = _settings(EmulatorSettings, args)
        logs.configure(log_opts["log_format"] or "auto", log_opts["log_level"] or "info")
        app = create_emulator_app(emulator)
        app.cleanup_ctx.append(logs.flush_periodically)
        _run(app, emulator.host, emulator.port, lambda: log.info(
            "emulator listening", url=f"http://{emulator.host}:{emulator.port}"))
        return

    emulator_port = args.pop("emulator_port")
    settings = _settings(Settings, {**args, **log_opts})
    emulator = None
    if settings.emulate_v3:  # the emulator's code is loaded only when it runs
        from proxy.emulator import EmulatorSettings

        emulator = _settings(EmulatorSettings, {"port": emulator_port})
    logs.configure(settings.log_format, settings.log_level)
    from proxy.app import create_app, start_draining

    try:
        app = create_app(settings, emulator)
    except MappingsError as e:
        print(f"upscale-v2-proxy: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    _run(app, settings.host, settings.port, lambda: log.info(
        "proxy listening", url=f"http://{settings.host}:{settings.port}",
        upstream="emulator" if settings.emulate_v3 else settings.upstream),
        Drain(settings.drain_delay, settings.shutdown_grace, partial(start_draining, app)))


@dataclass(frozen=True, slots=True)
class Drain:
    """What SIGTERM and SIGINT start: `begin` (for /readyz: 503 from now on), `delay` seconds more of
    serving everything, so that load balancers move away first (a second signal cuts it short); then
    the listener closes and requests in flight get `grace` seconds to finish."""

    delay: float = 0.0
    grace: float = 60.0
    begin: Callable[[], None] = lambda: None


def _run(app: web.Application, host: str, port: int, announce, drain: Drain = Drain()) -> None:
    """Serve until SIGTERM/SIGINT, then drain and stop (the app's cleanup_ctx stop the task engine and
    flush the logs last); `announce` once listening. A port in use exits 2, clearly."""
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(_serve(app, host, port, announce, drain))
    except OSError as e:  # most often: the port is taken
        logs.flush()
        print(f"upscale-v2-proxy: cannot start: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # where the loop has no signal handlers (Windows): stop without a drain
        pass
    finally:
        try:
            _cancel_all(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


async def _serve(app: web.Application, host: str, port: int, announce, drain: Drain) -> None:
    """web.run_app, but a signal starts a drain instead of closing the listener at once."""
    loop = asyncio.get_running_loop()
    log = structlog.get_logger("proxy")
    signals: list[signal.Signals] = []
    signalled = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        signals.append(sig)
        signalled.set()

    for sig in STOP_SIGNALS:  # from the start: a signal while starting up stops it cleanly too
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal, sig)
    # aiohttp's own handlers would close the listener at once: off
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=drain.grace,
                           keepalive_timeout=75.0)
    try:
        await runner.setup()  # every cleanup_ctx started: the upstream session, the stores, the engine
        try:
            await web.TCPSite(runner, host, port).start()
            announce()
            # stopped while starting: never ready, so no load balancer has to move away
            delay = 0.0 if signalled.is_set() else drain.delay
            await signalled.wait()
            log.info("draining", signal=signals[0].name, delay=delay, grace=drain.grace)
            drain.begin()
            signalled.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(signalled.wait(), delay)
            log.info("closing the listener", connections=len(runner.server.connections) if runner.server else 0)
        finally:
            # the listener closes, idle connections close, requests in flight get `grace` seconds;
            # then the cleanup_ctx stop in reverse: the task engine lets go of its tasks' leases,
            # the log flusher flushes last
            await runner.cleanup()
    finally:
        for sig in STOP_SIGNALS:
            with contextlib.suppress(NotImplementedError):
                loop.remove_signal_handler(sig)
    log.info("stopped")
    logs.flush()


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel and await whatever tasks are left, as asyncio.run does."""
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
