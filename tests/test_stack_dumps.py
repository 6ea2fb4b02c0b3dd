"""bridge.stack_dumps in a process of its own: a Windows service's process may have no stderr at all (pythonw,
a windowless service), and a stop past its deadline must still end it (the daemon's own cases are in
tests/test_daemon.py: SIGUSR1 and a stop held by a locked table)."""

from __future__ import annotations

import subprocess
import sys

from bridge.stack_dumps import EXIT_AFTER_DEADLINE, stop_deadline

WITHOUT_STDERR = """
import sys, threading
sys.__stderr__ = sys.stderr = None
from bridge import stack_dumps
print(stack_dumps.enable_on_request(), flush=True)
stack_dumps.arm_stop_deadline(0.2)
threading.Event().wait()  # a stop that never ends
"""


def test_a_process_without_stderr_still_ends_at_its_stop_deadline() -> None:
    done = subprocess.run([sys.executable, "-c", WITHOUT_STDERR], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (EXIT_AFTER_DEADLINE, "False\n")  # no dumps on request either
    assert done.stderr == ""


def test_the_stop_deadline_leaves_room_for_both_waits_of_shutdown_timeout() -> None:
    assert stop_deadline(30) == 90.0
    assert stop_deadline(1) == 32.0
