"""The daemon's lifecycle: listeners, background workers, graceful stop.

`pms-bridge serve` runs one asyncio loop holding the HTTP listeners and the background workers (audit
flush, stop-file watch, watched folders, push outboxes). It stops on SIGTERM/SIGINT, or when the stop
file appears (Windows service wrappers cannot always deliver Ctrl+C to a windowless process): listeners
stop accepting, in-flight requests get `shutdown_timeout` seconds to finish, workers are cancelled, the
audit queue is flushed, and the process exits 0. A stop that has not ended after twice `shutdown_timeout`
and a margin writes every thread's stack and exits 1 (bridge.stack_dumps).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import signal
import ssl
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from bridge import __version__, stack_dumps
from bridge.allocator import tune_for_large_buffers
from bridge.announce import announce_stored_elsewhere
from bridge.config import ConfigError, Settings, exposure_warnings
from bridge.handlers import vdds as vdds_handler
from bridge.handlers import vdds_push
from bridge.handlers.dexis import integrator_watchers
from bridge.runtime import Runtime
from bridge.store.db import SqliteFileGuard, StoreFileLost
from bridge.thumbfolders import thumbnail_workers
from bridge.tls import server_context
from bridge.web.app import build_api_app
from bridge.web.keys import LISTENER_TLS
from bridge.web.oppweb import opp_web_listener

log = logging.getLogger(__name__)

STOP_FILE_POLL_SECONDS = 0.5
STORE_FILE_CHECK_SECONDS = 5.0  # one stat of the SQLite store's path

# Background workers protocols contribute: each takes the runtime and returns a coroutine that runs
# until cancelled (a watched folder, an outbox channel), or None when its settings leave it off.
WorkerFactory = Callable[[Runtime], Coroutine[Any, Any, None] | None]
WORKER_FACTORIES: list[WorkerFactory] = [
    announce_stored_elsewhere,
    integrator_watchers,
    thumbnail_workers,
    vdds_handler.folder_worker,
    vdds_handler.cleanup_worker,
    vdds_push.push_worker,
]

# Extra listeners protocols contribute (OPP web): a factory returning (name, app, host, port), or None
# when its settings leave it off.
ListenerFactory = Callable[[Runtime], "tuple[str, web.Application, str, int] | None"]
LISTENER_FACTORIES: list[ListenerFactory] = [
    opp_web_listener,
]


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server TLS context when `[api] tls = yes`."""
    api = settings.api
    if not api.tls:
        return None
    if api.tls_cert is None or api.tls_key is None:
        raise ConfigError("[api] tls = yes needs tls_cert and tls_key")
    return server_context(("[api] tls_cert", api.tls_cert), ("[api] tls_key", api.tls_key))


# How long a thread holding the GIL may keep it while the event loop waits for it (Python's default is 5 ms).
# Database and audit threads run Python between their I/O; with the default, every one of the event loop's
# system calls can cost it up to 5 ms to get the GIL back, and a 30 ms audit flush stalls every answer.
SWITCH_INTERVAL = 0.0005


def _cannot_listen(name: str, host: str, port: int, exc: OSError) -> str:
    """One line for a listener that cannot bind: which one, where, and why (most often: taken)."""
    where = f"[{name}] host:port = {host}:{port}"
    if exc.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", errno.EADDRINUSE)):
        return (
            f"{where} is already in use (maybe by another pms-bridge on the same config):"
            " stop that process or choose another port"
        )
    return f"{where} cannot be listened on ({exc.strerror or exc}): check the host address and the port"


class Daemon:
    """One running pms-bridge: start(), then wait_stopped(); stop() may be called from anywhere."""

    def __init__(self, settings: Settings, runtime: Runtime | None = None) -> None:
        self.settings = settings
        self.rt = runtime
        self._runners: list[web.AppRunner] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self.bound: dict[str, tuple[str, int]] = {}

    async def start(self) -> None:
        self._remove_stale_stop_file()
        tune_for_large_buffers()  # files of megabytes pass through: no page faults for each one
        tls = tls_context(self.settings)  # a bad certificate is reported before the store is touched
        if self.rt is None:
            # a store it cannot reach or a schema it cannot use is one line (ConfigError), before "started"
            self.rt = await asyncio.to_thread(Runtime.build, self.settings)
        rt = self.rt
        timeout = self.settings.daemon.shutdown_timeout
        listeners: list[tuple[str, web.Application, str, int]] = [
            ("api", build_api_app(rt), self.settings.api.host, self.settings.api.port)
        ]
        for factory in LISTENER_FACTORIES:
            extra = factory(rt)
            if extra is not None:
                listeners.append(extra)
        # The workers are built before a listener answers and run once the listeners are bound (a second
        # daemon on the same ports stops before it touches a folder). No worker creates a watched folder:
        # a missing one is reported by its watcher and watched once it appears (bridge.watch).
        workers = [(make(rt), getattr(make, "__name__", "worker")) for make in WORKER_FACTORIES]
        try:
            await self._listen(listeners, tls, timeout)
        except BaseException:
            for worker, _name in workers:
                if worker is not None:
                    worker.close()
            for runner in self._runners:  # a listener bound before the one that failed
                await runner.cleanup()
            self._runners.clear()
            raise
        await self._remove_import_leftovers()
        self._spawn(rt.audit.run(), "audit")
        self._spawn(self._start_imaging_workers(rt), "imaging-workers")
        self._spawn(self._watch_stop_file(), "stop-file")
        if rt.db.file is not None:
            self._spawn(self._watch_store_file(rt.db.file), "store-file")
        for worker, name in workers:
            if worker is not None:
                self._spawn(worker, name)
        # Everything built so far (modules, SQLAlchemy metadata, codecs) lives as long as the process; kept
        # out of the cyclic collector, a full collection no longer walks it: without this one stalls every
        # listener for tens of milliseconds every few seconds under load.
        gc.collect()
        gc.freeze()
        sys.setswitchinterval(SWITCH_INTERVAL)
        log.info(
            "started",
            extra={
                "version": __version__,
                "config": str(self.settings.path),
                "store": rt.db.dialect,
                "instance": rt.instance_id,  # names this run's outbox claims (claimed_by)
            },
        )
        for warning in exposure_warnings(self.settings):
            log.warning("listener open to the network", extra={"warning": warning})

    async def _listen(
        self,
        listeners: list[tuple[str, web.Application, str, int]],
        tls: ssl.SSLContext | None,
        timeout: float,
    ) -> None:
        for name, app, host, port in listeners:
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=timeout, handle_signals=False)
            await runner.setup()
            site_tls = app.get(LISTENER_TLS, tls)
            site = web.TCPSite(runner, host, port, ssl_context=site_tls, reuse_address=True)
            try:
                await site.start()
            except OSError as exc:
                await runner.cleanup()
                raise ConfigError(_cannot_listen(name, host, port, exc)) from None
            self._runners.append(runner)
            sock = site._server.sockets[0]  # type: ignore[union-attr]
            self.bound[name] = sock.getsockname()[:2]
            log.info(
                "listening",
                extra={"listener": name, "host": host, "port": self.bound[name][1], "tls": bool(site_tls)},
            )

    async def _remove_import_leftovers(self) -> None:
        """Files of imports a crash interrupted (FileStore.remove_leftovers); a store that cannot be reached
        now is left to the readiness check."""
        assert self.rt is not None
        try:
            removed = await asyncio.to_thread(self.rt.files.remove_leftovers)
        except OSError as exc:
            log.warning("import leftovers not checked", extra={"reason": exc.strerror or str(exc)})
            return
        if removed:
            log.info("import leftovers removed", extra={"count": removed})

    @staticmethod
    async def _start_imaging_workers(rt: Runtime) -> None:
        """Fork the imaging pool's workers now, in the background: the first thumbnail a PMS asks for after a
        restart is then rendered at once, not after the pool's start-up (its fork server imports the
        decoders, half a second on two cores)."""
        pids = await rt.imaging.start_workers()
        log.info("imaging workers started", extra={"workers": len(pids), "pids": pids})

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._worker_done)
        self._tasks.append(task)

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("background worker died", exc_info=exc, extra={"worker": task.get_name()})

    def _remove_stale_stop_file(self) -> None:
        """A stop file already there was left by an earlier stop (it crashed, or was killed, before it
        removed it): obeying it would end this start at once with exit 0, and a service wrapper would
        not restart the daemon. It is removed, and the log says so."""
        path = self.settings.daemon.stop_file
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("stale stop file not removed", extra={"path": str(path), "reason": exc.strerror})
            return
        log.warning("stale stop file removed at start", extra={"path": str(path)})

    async def _watch_stop_file(self) -> None:
        path = self.settings.daemon.stop_file
        while True:
            if path.exists():
                log.info("stop file found; stopping", extra={"path": str(path)})
                with contextlib.suppress(OSError):
                    path.unlink()
                self.stop()
                return
            await asyncio.sleep(STOP_FILE_POLL_SECONDS)

    async def _watch_store_file(self, guard: SqliteFileGuard) -> None:
        """Checks the SQLite store's file every few seconds, so that its deletion is logged (once) even
        while nothing is written or asks /readyz; every write checks it anyway before it starts."""
        while True:
            with contextlib.suppress(StoreFileLost):
                await asyncio.to_thread(guard.check)
            await asyncio.sleep(STORE_FILE_CHECK_SECONDS)

    def stop(self) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        if sys.platform == "win32":

            def on_signal(_signum: int, _frame: object) -> None:
                loop.call_soon_threadsafe(self.stop)

            signal.signal(signal.SIGINT, on_signal)
            signal.signal(signal.SIGBREAK, on_signal)  # type: ignore[attr-defined,unused-ignore]
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)

    async def wait_stopped(self, deadline: float | None = None) -> None:
        """Wait for stop(), then shut down; with `deadline`, a process still running that many seconds
        after the stop began writes every thread's stack and exits (bridge.stack_dumps)."""
        await self._stop.wait()
        if deadline is not None:
            stack_dumps.arm_stop_deadline(deadline)
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop accepting, let in-flight requests finish, stop workers, flush the audit log, close."""
        log.info("stopping")
        for runner in self._runners:
            await runner.cleanup()  # stops listening, then waits for in-flight handlers
        self._runners.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.rt is not None:
            await self.rt.bus.drain()
            try:
                await self.rt.audit.flush()
            except StoreFileLost:  # the error itself was logged when the file went
                log.warning("queued audit entries not written", extra={"entries": self.rt.audit.queued})
            except Exception:
                log.exception("final audit flush failed")
            await asyncio.to_thread(self.rt.close, self.settings.daemon.shutdown_timeout)
        log.info("stopped")


async def serve(settings: Settings) -> None:
    """Run the daemon until a signal or the stop file; `kill -USR1` shows what each thread is doing."""
    daemon = Daemon(settings)
    stack_dumps.enable_on_request()
    daemon.install_signal_handlers()
    await daemon.start()
    await daemon.wait_stopped(stack_dumps.stop_deadline(settings.daemon.shutdown_timeout))
