"""upscale-v2-proxy serve | emulator | translate | audit | guide | fingerprint

Every option can also be set by environment variable (UPSCALE_PROXY_*, emulator:
UPSCALE_PROXY_EMULATOR_*); an option given on the command line wins.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import structlog
from aiohttp import web
from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsError

from proxy import __version__, logs
from proxy.mappings import MappingsError
from proxy.settings import Settings

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


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
    serve.add_argument("--workers", type=int, default=1, metavar="N",
                       help="processes serving one port (SO_REUSEPORT), sharing the data directory; "
                            "0: one per CPU (default 1)")
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # a worker of --workers

    emu = sub.add_parser("emulator", help="run the V3 emulator alone")
    emu.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    emu.add_argument("--port", type=int, help="port to listen on (default 9090)")
    emu.add_argument("--queue-delay", type=float, help="seconds a task stays QUEUED")
    emu.add_argument("--process-delay", type=float, help="seconds a task stays PROCESSING")
    emu.add_argument("--quiet-env", action="store_true", help=argparse.SUPPRESS)  # serve --workers's emulator

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
    from proxy.emulator.settings import EmulatorSettings

    known: set[str] = set()
    for cls in (Settings, EmulatorSettings):
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


def _url(host: str, port: int) -> str:
    """http://host:port, an IPv6 address in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


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
    if command == "fingerprint":
        return _fingerprint()
    log_opts = {"log_format": args.pop("log_format"), "log_level": args.pop("log_level")}
    log = structlog.get_logger("proxy")

    if command == "emulator":
        from proxy.emulator import EmulatorSettings, create_emulator_app

        quiet_env = args.pop("quiet_env")
        emulator = _settings(EmulatorSettings, args)
        logs.configure(log_opts["log_format"] or "auto", log_opts["log_level"] or "info")
        if not quiet_env:  # serve --workers has said it
            _warn_unknown_variables()
        app = create_emulator_app(emulator)
        app.cleanup_ctx.append(logs.flush_periodically)
        _run(app, emulator.host, emulator.port, lambda port: log.info(
            "emulator listening", url=_url(emulator.host, port)))
        return

    emulator_port = args.pop("emulator_port")
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
    logs.configure(settings.log_format, settings.log_level, shared=reuse_port or workers > 1)
    if not reuse_port:  # a worker's parent has said it
        _warn_unknown_variables()
    if workers > 1:
        raise SystemExit(Workers(settings, emulator, workers).run())
    from proxy.app import create_app, start_draining

    try:
        app = create_app(settings, emulator)
    except MappingsError as e:
        print(f"upscale-v2-proxy: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    _run(app, settings.host, settings.port, lambda port: log.info(
        "proxy listening", url=_url(settings.host, port),
        upstream="emulator" if settings.emulate_v3 else settings.upstream),
        Drain(settings.drain_delay, settings.shutdown_grace, partial(start_draining, app)), reuse_port=reuse_port)


class Workers:
    """`serve --workers N`: N `serve` processes on one port (SO_REUSEPORT: the kernel spreads the
    connections), each a whole proxy on the shared data directory. Under --emulate-v3 the emulator
    runs once, as its own process, and is every worker's upstream (a task submitted through one
    worker is polled through another). Metrics: prometheus-client's multiprocess mode, in a
    directory made here and removed at the end. SIGTERM/SIGINT are passed on to every worker (each
    drains as one process does); once they have all stopped, this one exits 0. A worker that stops
    by itself stops the others, and this process exits non-zero: the orchestrator restarts it whole.
    """

    def __init__(self, settings: Settings, emulator, count: int) -> None:
        self.settings, self.emulator, self.count = settings, emulator, count
        self.log = structlog.get_logger("proxy")
        self.signals: list[int] = []

    def run(self) -> int:
        s = self.settings
        metrics_dir = tempfile.mkdtemp(prefix="upscale-proxy-metrics-")
        children: list[subprocess.Popen] = []
        emulator: subprocess.Popen | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        try:
            with self._reserve(s.host, s.port) as port:
                env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
                upstream = s.upstream
                if s.emulate_v3:
                    emulator, upstream = self._start_emulator()
                    env["UPSCALE_PROXY_EMULATE_V3"] = "false"
                    env.setdefault("UPSCALE_PROXY_IMAGE_ORIGINS", upstream)  # its images: its own origin
                command = [sys.executable, "-m", "proxy", "serve", "--reuse-port", "--workers", "1",
                           "--host", s.host, "--port", str(port), "--upstream", upstream,
                           "--log-format", s.log_format, "--log-level", s.log_level]
                for _ in range(self.count):
                    if not self.signals:
                        # its own process group: a terminal's Ctrl-C reaches this process only, which passes it on once
                        children.append(subprocess.Popen(command, env=env, process_group=0))
                self.log.info("workers started", url=_url(s.host, port), workers=[c.pid for c in children],
                              upstream="emulator" if s.emulate_v3 else s.upstream)
                logs.flush()
                return self._watch(children)
        except OSError as e:
            logs.flush()
            print(f"upscale-v2-proxy: cannot start: {e}", file=sys.stderr)
            return 2
        finally:
            self._stop(children)
            if emulator is not None:
                self._stop([emulator])
            shutil.rmtree(metrics_dir, ignore_errors=True)
            self.log.info("stopped")
            logs.flush()

    def _on_signal(self, sig: int, _frame: object) -> None:
        self.signals.append(sig)

    def _watch(self, children: list[subprocess.Popen]) -> int:
        """Until every worker has stopped: each signal passed on to them all; a worker that ends
        without one ends the rest."""
        forwarded = 0
        failed: int | None = None
        while any(c.poll() is None for c in children):
            for sig in self.signals[forwarded:]:
                if forwarded == 0:
                    self.log.info("stopping workers", signal=signal.Signals(sig).name)
                    logs.flush()
                for c in children:
                    if c.poll() is None:
                        c.send_signal(sig)
                forwarded += 1
            if failed is None and not self.signals:
                gone = next((c for c in children if c.returncode is not None), None)
                if gone is not None:
                    failed = gone.returncode or 1
                    self.log.error("a worker stopped by itself: stopping the others", pid=gone.pid,
                                   code=gone.returncode)
                    logs.flush()
                    for c in children:
                        if c.poll() is None:
                            c.send_signal(signal.SIGTERM)
            time.sleep(0.05)
        if failed is None and not self.signals:  # all of them stopped at once, before a look
            failed = next((c.returncode for c in children if c.returncode), 1) if children else 0
        if failed is not None:
            return failed
        return 0 if all(c.returncode == 0 for c in children) else 1

    def _stop(self, processes: list[subprocess.Popen]) -> None:
        """Whatever still runs (an error in this process): SIGTERM, then SIGKILL past the grace."""
        for p in processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.drain_delay + self.settings.shutdown_grace + 5
        for p in processes:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    @contextlib.contextmanager
    def _reserve(self, host: str, port: int):
        """The port the workers share; port 0: one the OS picks, held (bound, SO_REUSEPORT, never
        listening, so it gets no connection) until the workers have stopped."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if port == 0:
                sock.bind((host, 0))
            yield sock.getsockname()[1] if port == 0 else port

    def _start_emulator(self) -> tuple[subprocess.Popen, str]:
        """The one V3 emulator of every worker, as a process; its URL once it listens."""
        from proxy.emulator import EmulatorSettings

        e = self.emulator or EmulatorSettings()
        port = e.port
        if port == 0:
            with socket.socket(socket.AF_INET6 if ":" in e.host else socket.AF_INET) as sock:
                sock.bind((e.host, 0))
                port = sock.getsockname()[1]
        env = {**os.environ, "UPSCALE_PROXY_EMULATOR_PORT": str(port)}
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "emulator", "--quiet-env", "--log-format", self.settings.log_format,
                                 "--log-level", self.settings.log_level], env=env, process_group=0)
        connect_host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(e.host, e.host)
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise OSError(f"the V3 emulator did not start (exit {proc.returncode})")
            with contextlib.suppress(OSError), socket.create_connection((connect_host, port), timeout=1):
                break
            if time.monotonic() > deadline:
                proc.kill()
                raise OSError(f"the V3 emulator did not listen on port {port} within 30 s")
            time.sleep(0.05)
        return proc, _url(connect_host, port)


@dataclass(frozen=True, slots=True)
class Drain:
    """What SIGTERM and SIGINT start: `begin` (for /readyz: 503 from now on), `delay` seconds more of
    serving everything, so that load balancers move away first (a second signal cuts it short); then
    the listener closes and requests in flight get `grace` seconds to finish."""

    delay: float = 0.0
    grace: float = 60.0
    begin: Callable[[], None] = lambda: None


def _run(app: web.Application, host: str, port: int, announce, drain: Drain = Drain(), *,
         reuse_port: bool = False) -> None:
    """Serve until SIGTERM/SIGINT, then drain and stop (the app's cleanup_ctx stop the task engine and
    flush the logs last); `announce(port)` once listening, with the port bound (port 0: the one the
    OS chose). A port in use exits 2, clearly."""
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(_serve(app, host, port, announce, drain, reuse_port))
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


async def _serve(app: web.Application, host: str, port: int, announce, drain: Drain,
                 reuse_port: bool = False) -> None:
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
            await web.TCPSite(runner, host, port, reuse_port=reuse_port or None).start()
            announce(runner.addresses[0][1] if runner.addresses else port)  # port 0: the one the OS chose
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
