"""Running real `pms-bridge` commands on a store, and the commands that open it (for tests that hold
every one of them to the same refusal)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import pms_bridge_command


def pms_bridge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*pms_bridge_command(), *args], capture_output=True, text=True, timeout=120, env=dict(os.environ)
    )


def store_commands(config: Path, tmp_path: Path) -> dict[str, list[str]]:
    """Every command that opens the store (doctor apart: it reports instead of stopping)."""
    return {
        "serve": ["serve", "--config", str(config)],
        "import": ["import", "--config", str(config), str(tmp_path / "nothing.dcm")],
        "export-dicom": [
            "export-dicom",
            "--config",
            str(config),
            "--patient",
            "P1",
            "--out",
            str(tmp_path / "out"),
        ],
        "reconcile": ["reconcile", "--config", str(config)],
        "outbox": ["outbox", "list", "--config", str(config)],
    }


def one_line(result: subprocess.CompletedProcess[str], name: str) -> str:
    """The single stderr line of a command that refused to run (exit 2, no traceback)."""
    assert result.returncode == 2, (name, result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1, (name, result.stderr)
    return result.stderr.strip()
