"""Every thread's stack on stderr, for a daemon that hangs: on request, and when a stop takes too long.

A daemon that no longer answers, or that does not end after SIGTERM, leaves an admin nothing to go on but
a debugger the practice's server does not have. Python's faulthandler writes the stack of every thread
from C, without the GIL or the event loop, so it works when both are stuck:

- `kill -USR1 <pid>` writes them and the daemon runs on (POSIX; Windows has no such signal);
- once a stop has begun, a daemon still running after its deadline writes them and exits with status 1
  (`EXIT_AFTER_DEADLINE`), so that a service manager sees it end and can start it again instead of waiting
  for its own stop timeout. The deadline covers the stop's parts that wait (in-flight requests, then the
  imaging pool's busy workers, each up to `[daemon] shutdown_timeout`) and then the interpreter's own end,
  which joins the threads and process pools it knows of without any timeout.

The dumps go to stderr, which a service manager keeps (the journal, WinSW's log), as plain text between
the log's records: a traceback is read by a person, not parsed.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
from typing import TextIO

# faulthandler's status when its deadline runs out; a stop that ends in time exits 0
EXIT_AFTER_DEADLINE = 1
# what a stop may take beyond its two waits of `shutdown_timeout`: the audit flush, closing the store, the
# interpreter's end
STOP_MARGIN_SECONDS = 30.0


def _stderr() -> TextIO | None:
    """stderr when it is a real file (a windowless Windows process may have none)."""
    stream = sys.__stderr__
    try:
        if stream is not None:
            stream.fileno()
            return stream
    except (OSError, ValueError):
        pass
    return None


def enable_on_request() -> bool:
    """`kill -USR1 <pid>` writes every thread's stack to stderr; whether that is available here."""
    stream = _stderr()
    usr1 = getattr(signal, "SIGUSR1", None)
    if stream is None or usr1 is None:
        return False
    faulthandler.register(usr1, file=stream, all_threads=True)
    return True


def stop_deadline(shutdown_timeout: float) -> float:
    """How long a stop may take in all, in seconds, before the process is ended (see the module)."""
    return 2 * shutdown_timeout + STOP_MARGIN_SECONDS


def arm_stop_deadline(seconds: float) -> None:
    """In `seconds`, unless the process has ended: every thread's stack on stderr, then exit with status
    EXIT_AFTER_DEADLINE. Called once a stop begins; calling it again moves the deadline."""
    global _nowhere
    stream = _stderr()
    if stream is None:  # nowhere to write the stacks to: the process still ends
        _nowhere = _nowhere or open(os.devnull, "w")  # noqa: SIM115 - open for the process's life
        stream = _nowhere
    faulthandler.dump_traceback_later(seconds, exit=True, file=stream)


_nowhere: TextIO | None = None
