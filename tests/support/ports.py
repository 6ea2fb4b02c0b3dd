"""Free loopback ports for the servers tests and benchmarks start (daemons, Orthanc, bare handlers)."""

from __future__ import annotations

import socket

_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port free now and not handed out before by this process.

    The probe socket is closed before the port is returned (the server that gets it binds it later), so
    the kernel may offer the same port to the next call: a daemon's API and OPP web ports, or Orthanc's
    HTTP and DICOM ports, then collided ("already in use": about one benchmark run in a dozen).
    """
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
