"""Serving: one process until SIGTERM/SIGINT with a graceful drain, or `--workers N` processes on
one port. The command line (proxy/cli.py) decides what to serve; this module only runs it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from proxy import logs
from proxy.settings import Settings

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def announced_url(host: str, port: int) -> str:
    """http://host:port, an IPv6 address in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class Workers:
    """`serve --workers N`: N `serve` processes on one port (SO_REUSEPORT: the kernel spreads the
    connections), each a whole proxy on the shared data directory. Under --emulate-v3 the emulator
    runs once, as its own process, and is every worker's upstream (a task submitted through one
    worker is polled through another). Metrics: prometheus-client's multiprocess mode, in a
    directory made here and removed at the end. SIGTERM/SIGINT are passed on to every worker (each
    drains as one process does); once they have all stopped, this one exits 0. A worker that stops
    by itself stops the others, and this process exits non-zero: the orchestrator restarts it whole.
    """

    def __init__(self, settings: Settings, emulator, count: int,
                 announce: Callable[[int], None] = lambda port: None) -> None:
        self.settings, self.emulator, self.count, self.announce = settings, emulator, count, announce
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
                if s.admin_token:  # made here when unset: every worker accepts the same one
                    env["UPSCALE_PROXY_ADMIN_TOKEN"] = s.admin_token.get_secret_value()
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
                self.log.info("workers started", url=announced_url(s.host, port), workers=[c.pid for c in children],
                              upstream="emulator" if s.emulate_v3 else s.upstream)
                self.announce(port)
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
        return proc, announced_url(connect_host, port)


MALFORMED = "400 Bad Request: the request line or headers could not be parsed"


class _Connection(RequestHandler):
    """aiohttp's handler of one connection, but a request its parser refuses gets MALFORMED, a fixed
    400: aiohttp's own text quotes the bytes it could not parse (`Invalid header value char` and
    the raw header, a key or whatever a client chose), and it has no hook for that reply
    (aio-libs/aiohttp#3287). Only that error path differs: nothing is added per request."""

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if isinstance(exc, HttpProcessingError):  # the parser's: its message quotes the request
            message = MALFORMED
        return super().handle_error(request, status, exc, message)


class _Server(web.Server):
    """aiohttp's Server (the protocol factory: one handler per connection), making `_Connection`s.
    It and ProxyRunner reach into aiohttp 3.x internals (`_make_server`, `_loop`, `_kwargs`);
    tests/test_hostile.py fails if an upgrade moves them."""

    def __call__(self) -> RequestHandler:
        return _Connection(self, loop=self._loop, **self._kwargs)


class ProxyRunner(web.AppRunner):
    """How `serve` runs the app: aiohttp's runner and server as they are, with the settings below,
    but connections made by `_Connection`."""

    def __init__(self, app: web.Application, grace: float = 60.0) -> None:
        # aiohttp's signal handlers would close the listener at once: off (`_serve` drains instead)
        super().__init__(app, handle_signals=False, access_log=None, shutdown_timeout=grace,
                         keepalive_timeout=75.0)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server  # the server aiohttp made for the app, all but its connections' class
        return server


@dataclass(frozen=True, slots=True)
class Drain:
    """What SIGTERM and SIGINT start: `begin` (for /readyz: 503 from now on), `delay` seconds more of
    serving everything, so that load balancers move away first (a second signal cuts it short); then
    the listener closes and requests in flight get `grace` seconds to finish."""

    delay: float = 0.0
    grace: float = 60.0
    begin: Callable[[], None] = lambda: None


def run(app: web.Application, host: str, port: int, announce, drain: Drain = Drain(), *,
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
    runner = ProxyRunner(app, drain.grace)
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
