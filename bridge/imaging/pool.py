"""How the imaging process pool starts its workers.

On Linux a fork server imports the modules pool tasks run once, and every worker is forked from it warm:
the pool starts its workers one by one as work arrives, and a worker importing these modules in the
middle of an import holds up the files waiting for it. Elsewhere (Windows, macOS) workers are spawned.

A worker ends when the process that made the pool is gone (`watch_parent`, the pool's initializer): a
worker holds the pipes of the pool's queues and of the fork server, so a daemon that was killed (SIGKILL,
a crash, a service manager that does not kill the process group) left its fork server and workers running
for good, about 40 MB each; the tests that kill daemons on purpose left hundreds.

A worker keeps the memory it frees for its next file (bridge.allocator, as the daemon does): an import
holds a file's few megabytes at a time, two while one is written as the next is read, and glibc's default
handed them back to the system and mapped fresh pages for about half of them, which a virtual machine pays
for page by page (docs/dicom.md, "Performance").

`prestart` launches the fork server before the pool exists: `pms-bridge import` calls it first thing, so
the server's imports run beside the command's own (about a quarter of a second of its start-up on two
cores). `hold` is the task that starts every worker at once (`Imaging.start_workers`). Imports nothing
heavy itself.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from multiprocessing.connection import wait
from multiprocessing.context import BaseContext

from bridge.allocator import tune_for_large_buffers

# What pool tasks run: decoding and rendering, and the worker side of a DICOM import.
POOL_MODULES = ["bridge.imaging.render", "bridge.dicom.prepare", "bridge.dicom.fileset", "pydicom"]


def context() -> BaseContext:
    """The multiprocessing context of the pool."""
    if not sys.platform.startswith("linux"):
        return multiprocessing.get_context("spawn")
    forkserver = multiprocessing.get_context("forkserver")
    forkserver.set_forkserver_preload(POOL_MODULES)
    return forkserver


def prestart() -> None:
    """Start the fork server (and its imports) now, without waiting for it; nothing elsewhere."""
    if context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


HOLD_SECONDS = 0.05


def hold() -> int:
    """A worker's pid, after keeping it busy briefly: tasks submitted together then find no idle worker,
    so the pool forks one worker for each (it starts a worker only when none is idle)."""
    time.sleep(HOLD_SECONDS)
    return os.getpid()


def start_worker() -> None:
    """The pool's initializer, in every new worker."""
    watch_parent()
    tune_for_large_buffers()


def watch_parent() -> None:
    """In a new worker: end it as soon as the process that made the pool is gone (its sentinel, a pipe the
    parent holds the other end of, or its process handle on Windows, becomes ready when it ends)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
