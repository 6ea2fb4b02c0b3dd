"""The US sample cases replayed as integration engineers replay them: `pms-bridge replay samples/<x>`.

Each case runs against a fresh store and a real daemon, with the real `pms-bridge <protocol>` launch
commands as subprocesses (see samples/README.md); every case must pass.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import pms_bridge_command

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
US_PROTOCOLS = ("dexis", "dentrix", "eaglesoft", "cliniview")


@pytest.mark.parametrize("protocol", US_PROTOCOLS)
def test_every_sample_case_passes(protocol: str) -> None:
    cases = sorted(p.parent.name for p in (SAMPLES / protocol).rglob("case.json"))
    assert cases, f"no cases under samples/{protocol}"
    proc = subprocess.run(
        [*pms_bridge_command(), "replay", str(SAMPLES / protocol)],
        capture_output=True,
        timeout=600,
        check=False,
    )
    table = proc.stdout.decode("utf-8", "replace")
    assert proc.returncode == 0, table + proc.stderr.decode("utf-8", "replace")[-2000:]
    assert table.strip().splitlines()[-1] == f"{len(cases)} pass"


@pytest.mark.parametrize("protocol", US_PROTOCOLS)
def test_every_case_says_what_it_shows_and_keeps_windows_bytes(protocol: str) -> None:
    for spec_file in sorted((SAMPLES / protocol).rglob("case.json")):
        spec = json.loads(spec_file.read_text(encoding="utf-8"))
        assert spec["description"].strip() and "\n" not in spec["description"], spec_file
        for request in spec_file.parent.glob("request.*"):
            data = request.read_bytes()
            if request.suffix in (".txt", ".ini") and not data.startswith(b"\xff\xfe"):
                data.decode("cp1252")  # the code page the PMS writes
                assert b"\n" not in data.replace(b"\r\n", b""), f"{request}: LF without CR"
