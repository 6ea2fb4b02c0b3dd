"""A fresh Orthanc of our own, for the round-trip test and the import benchmark.

The Debian package may run a system Orthanc; this one has a config of its own, free loopback ports, remote
access off and authentication off (loopback only), and is stopped by its process id.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.ports import free_port

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"


@contextmanager
def running_orthanc(home: Path) -> Iterator[int]:
    """Start Orthanc with its storage under `home`; yields its HTTP port once /system answers."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "Name": "pms-bridge-test",
        "HttpPort": port,
        "DicomPort": free_port(),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "StorageDirectory": str(home / "data"),
        "IndexDirectory": str(home / "data"),
        "Plugins": [],
    }
    (home / "orthanc.json").write_text(json.dumps(config), encoding="utf-8")
    with open(home / "orthanc.log", "wb") as log:
        process = subprocess.Popen(
            [ORTHANC, str(home / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/system", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((home / "orthanc.log").read_text(errors="replace")) from None
                time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        process.wait(30)
