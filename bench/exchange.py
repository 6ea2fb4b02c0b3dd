"""Benchmark: the VDDS module's end-to-end time and the watched folder's latency.

Prints, in one run:
* bare interpreter start-up (`python -c pass`), the baseline, measured alternately with each of the next
  two (so that a busy machine slows both alike);
* `pms-bridge vdds FILE` for a stage-1 request against a running daemon, from process start to exit
  (READY=1 written), and the same when the daemon is down (the error answer written by the client);
* the watched exchange folder's latency: from a complete file appearing (atomic rename) to READY=1 in it.

Targets (issue 4): module <= 3x bare start-up; folder latency <= poll interval + 50 ms. Figures only: the
benchmark asserts nothing. The packages are byte-compiled first, as an installer does: with
PYTHONDONTWRITEBYTECODE set, an editable checkout would otherwise compile its sources on every launch.

    .venv/bin/python bench/exchange.py [--runs 30] [--poll 1.0]
"""

from __future__ import annotations

import argparse
import compileall
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bridge.replay import launch_command, write_fresh_config

STAGE1 = (
    "[PATIENT]\r\nPVS=BENCH\r\nPATID=004711\r\nLASTNAME=Müller\r\nFIRSTNAME=Heinz, von\r\n"
    "BIRTHDAY=19710101\r\nSEX=W\r\nREADY=0\r\nERRORLEVEL=0\r\nERRORTEXT=\r\n"
).encode("cp1252")


def timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - started


def summary(name: str, values: list[float], base: float | None = None) -> str:
    ms = sorted(v * 1000 for v in values)
    median = statistics.median(ms)
    p90 = ms[int(0.9 * (len(ms) - 1))]
    ratio = f"  {median / base:4.2f}x bare" if base else ""
    return f"{name:<44} median {median:7.1f} ms  p90 {p90:7.1f} ms  max {ms[-1]:7.1f} ms{ratio}"


def wait_ready(path: Path, timeout: float) -> float | None:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        try:
            if b"READY=1" in path.read_bytes():
                return time.perf_counter()
        except OSError:
            pass
        time.sleep(0.0005)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--poll", type=float, default=1.0, help="[vdds] poll_seconds of the watched folder")
    ns = parser.parse_args()
    for package in ("bridge", "protocols"):
        compileall.compile_dir(Path(__file__).resolve().parent.parent / package, quiet=1)

    home = Path(tempfile.mkdtemp(prefix="bench-exchange-"))
    exchange = home / "exchange"
    exchange.mkdir()  # the PVS's share: the daemon does not create it
    config = write_fresh_config(
        home,
        {"vdds": {"exchange_dir": str(exchange), "poll_seconds": ns.poll}, "daemon": {"log_level": "error"}},
    )
    env = {**os.environ, "PMS_BRIDGE_CONFIG": str(config)}
    module = [*launch_command(), "vdds"]
    request = home / "MME505F.tmp"
    daemon = subprocess.Popen([*launch_command(), "serve", "--config", str(config)], env=env)
    try:
        port = next(
            line.split("=")[1].strip() for line in config.read_text().splitlines() if line.startswith("port")
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        bare, online, bare_offline, offline, folder = [], [], [], [], []
        request.write_bytes(STAGE1)
        timed([*module, str(request)], env)  # warm-up: the patient exists from here on
        for _ in range(ns.runs):
            bare.append(timed([sys.executable, "-c", "pass"], env))
            request.write_bytes(STAGE1)
            online.append(timed([*module, str(request)], env))
            if b"READY=1" not in request.read_bytes():
                print("the module did not write READY=1", file=sys.stderr)
                return 1
        for i in range(ns.runs):
            time.sleep(ns.poll * (i % 7) / 7)  # drop at every phase of the poll cycle
            target = exchange / f"REQ{i:03d}.tmp"
            tmp = exchange / f".REQ{i:03d}.part"
            tmp.write_bytes(STAGE1)
            started = time.perf_counter()
            tmp.replace(target)
            answered = wait_ready(target, 10 * ns.poll + 10)
            if answered is None:
                print(f"{target.name} was not answered", file=sys.stderr)
                return 1
            folder.append(answered - started)
    finally:
        daemon.terminate()
        daemon.wait(30)
    bad_env = {**env, "PMS_BRIDGE__API__PORT": "9"}  # nothing listens there: the daemon is "down"
    for _ in range(ns.runs):
        bare_offline.append(timed([sys.executable, "-c", "pass"], env))
        request.write_bytes(STAGE1)
        offline.append(timed([*module, str(request)], bad_env))
    shutil.rmtree(home, ignore_errors=True)

    base = statistics.median(bare) * 1000
    base_offline = statistics.median(bare_offline) * 1000
    print(summary("python -c pass (bare start-up, baseline)", bare))
    print(summary("pms-bridge vdds FILE (stage 1, daemon up)", online, base))
    print(summary("python -c pass (baseline, second phase)", bare_offline))
    print(summary("pms-bridge vdds FILE (daemon down, error)", offline, base_offline))
    print(summary(f"watched folder, file -> READY=1 (poll {ns.poll:g} s)", folder))
    folder_target = ns.poll * 1000 + 50
    print(f"targets: module <= {3 * base:.1f} ms (3x bare); folder <= {folder_target:.0f} ms (poll + 50 ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
