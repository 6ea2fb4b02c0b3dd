"""OPP web benchmark: 50 concurrent clients sending VIEW and VIEW_DATA for 10 s against a real daemon.

Prints requests/s, p50 and p99 next to a bare aiohttp handler measured on the same machine in the same run
(the baseline: one asyncio process that reads the body and answers a fixed XML document; no parsing, no
store). Three kinds of process: the daemon (`pms-bridge serve`), the baseline server, and the load
generator, which runs apart from both so it does not take the event loop it measures. Targets (issue 5):
>= 0.5x the bare handler's throughput, p99 <= 25 ms.

The clients ask for the same 200 patients again and again, as a practice's browser-based PMS does, so after
the warm-up the daemon answers from memory (`[store] memo_reads`, docs/operations.md). A second daemon on
the same store with `memo_reads = no` is measured in the same run too: the cost when every request asks
the store (a patient asked for the first time, or a store that changes all the time).

Besides the closed loop (every client sends its next request as soon as it has the answer: saturation),
it reports each server's CPU time per request, which does not depend on what else the machine is doing,
and a paced run (`--rate` requests/s in all, 25 by default: 50 workstations each clicking every 2 s,
far above a practice's real rate), which shows the latency a PMS sees below saturation.

    python bench/oppweb.py [--clients 50] [--seconds 10] [--warmup 2] [--patients 200] [--images 3]
                           [--rate 25] [--store sqlite|postgresql] [--pg SERVER_URL]

The internal modes `--serve-bare PORT` and `--load URL ...` are how the script starts its own processes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.proc import cpu_seconds  # noqa: E402 - after the path to the project
from tests.support.ports import free_port  # noqa: E402

SCRIPT = Path(sys.executable).with_name("pms-bridge")
SOFTWARE = "BenchPMS"
COMMANDS = ("VIEW", "VIEW_DATA")


def opp_body(command: str, reference: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<opp version="1.3">\n'
        f'  <command type="{command}" silent="NO"/>\n  <software name="{SOFTWARE}" version="1"/>\n'
        f'  <patient reference="{reference}" firstName="Jürgen" lastName="Müller-{reference}" '
        f'birthdate="1985-07-14" gender="MALE"/>\n</opp>\n'
    ).encode()


# --------------------------------------------------------------------------------------------------
# The baseline: a bare aiohttp handler (its own process)


def serve_bare(port: int) -> None:
    """One aiohttp handler that reads the body and answers a fixed XML document of a typical size."""
    from aiohttp import web

    answer = (
        b"<?xml version='1.0' encoding='UTF-8'?>\n"
        b'<oppResult version="1.3" command="VIEW" status="ok" patientId="1">\n  <message>ok</message>\n'
        b'  <patient id="1" reference="1" software="BenchPMS" lastName="M\xc3\xbcller" gender="MALE"/>\n'
        b"</oppResult>\n"
    )

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=answer, content_type="application/xml")

    app = web.Application()
    app.router.add_route("*", "/opp", handler)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# --------------------------------------------------------------------------------------------------
# The load generator (its own process)


async def load(args: argparse.Namespace) -> dict[str, Any]:
    """`clients` workers alternating VIEW and VIEW_DATA for random patients; closed loop, or paced."""
    import aiohttp

    references: list[str] = args.references.split(",")
    bodies = {(command, ref): opp_body(command, ref) for command in COMMANDS for ref in references}
    latencies: dict[str, list[float]] = {command: [] for command in COMMANDS}
    errors: dict[str, int] = {}
    started = time.perf_counter()
    measure_from = started + args.warmup
    stop_at = measure_from + args.seconds
    interval = args.clients / args.rate if args.rate > 0 else 0.0
    headers = {"Content-Type": "application/xml", "Accept": "application/json"}

    async def worker(session: aiohttp.ClientSession, seed: int) -> None:
        rng = random.Random(seed)
        n = seed
        next_at = started + rng.random() * interval
        while time.perf_counter() < stop_at:
            if interval:
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                next_at += interval
            command = COMMANDS[n % 2]
            n += 1
            sent = time.perf_counter()
            try:
                async with session.post(
                    args.load, data=bodies[(command, rng.choice(references))], headers=headers
                ) as r:
                    await r.read()
                    outcome = str(r.status)
            except aiohttp.ClientError as exc:
                outcome = type(exc).__name__
            done = time.perf_counter()
            if sent < measure_from or done > stop_at:
                continue
            if outcome == "200":
                latencies[command].append(done - sent)
            else:
                errors[outcome] = errors.get(outcome, 0) + 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.clients)) as session:
        await asyncio.gather(*(worker(session, i) for i in range(args.clients)))
    return {"seconds": args.seconds, "latencies": latencies, "errors": errors}


def run_load(
    url: str, server_pid: int, references: list[str], args: argparse.Namespace, rate: float
) -> dict[str, Any]:
    """Run the load generator as its own process; its result plus the server's CPU time meanwhile."""
    cpu_before = cpu_seconds(server_pid)
    command = [sys.executable, __file__, "--load", url, "--references", ",".join(references)]
    command += ["--clients", str(args.clients), "--seconds", str(args.seconds), "--warmup", str(args.warmup)]
    done = subprocess.run([*command, "--rate", str(rate)], capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(done.stdout)
    result["server_cpu"] = cpu_seconds(server_pid) - cpu_before
    return result


# --------------------------------------------------------------------------------------------------
# The daemon under test


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status < 500:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def start_daemon(
    home: Path, store_url: str, *, memo: bool = True, name: str = "pms-bridge"
) -> tuple[subprocess.Popen[bytes], str, str, str]:
    api_port, opp_port, token = free_port(), free_port(), "bench-token"
    config = home / f"{name}.ini"
    config.write_text(
        f"[store]\nurl = {store_url}\nimages = {home / 'images'}\nmemo_reads = {'yes' if memo else 'no'}\n"
        f"[api]\nport = {api_port}\ntoken = {token}\n[opp_web]\nport = {opp_port}\n"
        f"[daemon]\nlog_level = warning\nstop_file = {home / (name + '.stop')}\n",
        encoding="utf-8",
    )
    with open(home / f"{name}.log", "ab") as log:  # the child keeps its own handle
        proc = subprocess.Popen([str(SCRIPT), "serve", "--config", str(config)], stdout=log, stderr=log)
    api = f"http://127.0.0.1:{api_port}"
    wait_http(api + "/healthz")
    return proc, api, f"http://127.0.0.1:{opp_port}/opp", token


def seed(api: str, opp_url: str, token: str, patients: int, images: int) -> list[str]:
    """Patients created through OPP web itself, `images` uploads each through the REST API."""
    from PIL import Image

    references = [f"{i:06d}" for i in range(1, patients + 1)]
    png = io.BytesIO()
    picture = Image.new("L", (800, 600), 40)
    picture.paste(200, (300, 200, 500, 400))
    picture.save(png, "PNG")
    boundary = "bench-boundary"
    upload = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="category"\r\n\r\nintraoral-xray\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + png.getvalue()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    for ref in references:
        request = urllib.request.Request(
            opp_url,
            data=opp_body("UPDATE_CREATE", ref),
            headers={"Accept": "application/json", "Content-Type": "application/xml"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            patient_id = json.loads(response.read())["patient_id"]
        for _ in range(images):
            request = urllib.request.Request(
                f"{api}/api/v1/patients/{patient_id}/images",
                data=upload,
                headers={
                    "Authorization": f"Bearer {token}",
                    "Content-Type": f"multipart/form-data; boundary={boundary}",
                },
            )
            with urllib.request.urlopen(request, timeout=60):
                pass
    return references


@contextlib.contextmanager
def store(args: argparse.Namespace, home: Path) -> Iterator[str]:
    """The store URL: a fresh SQLite file, or a database on a PostgreSQL server (throwaway by default)."""
    if args.store == "sqlite":
        yield f"sqlite:///{home / 'bridge.db'}"
        return
    from tests.support.pg import create_database, throwaway_cluster

    if args.pg:
        yield create_database(args.pg, f"bench_oppweb_{int(time.time())}")
        return
    with throwaway_cluster() as server:
        yield create_database(server, "bench_oppweb")


# --------------------------------------------------------------------------------------------------
# Report


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def row(name: str, latencies: list[float], seconds: float, cpu: float | None, errors: int | None) -> str:
    rps = len(latencies) / seconds
    cpu_ms = f"{cpu / len(latencies) * 1000:.2f}" if cpu is not None and latencies else ""
    errs = "" if errors is None else str(errors)
    return (
        f"{name:<40} {rps:>8.0f} {pct(latencies, 0.5):>8.2f} {pct(latencies, 0.99):>8.2f} "
        f"{cpu_ms:>12} {errs:>7}"
    )


def table(
    title: str, bare: dict[str, Any], opp: dict[str, Any], uncached: dict[str, Any]
) -> tuple[float, float]:
    """Print one run's rows; returns (OPP web / bare throughput, OPP web p99 in ms)."""
    print(title)
    print(f"{'target':<40} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms/req':>12} {'errors':>7}")
    flat = {
        name: [v for values in r["latencies"].values() for v in values]
        for name, r in (("bare", bare), ("opp", opp), ("uncached", uncached))
    }
    for key, label, result in (
        ("bare", "bare aiohttp handler (baseline)", bare),
        ("opp", "OPP web, VIEW + VIEW_DATA", opp),
    ):
        print(row(label, flat[key], result["seconds"], result["server_cpu"], sum(result["errors"].values())))
    for command in COMMANDS:
        print(row(f"  of which {command}", opp["latencies"][command], opp["seconds"], None, None))
    print(
        row(
            "OPP web, memo_reads = no",
            flat["uncached"],
            uncached["seconds"],
            uncached["server_cpu"],
            sum(uncached["errors"].values()),
        )
    )
    for name, result in (("bare", bare), ("OPP web", opp), ("memo_reads = no", uncached)):
        if result["errors"]:
            print(f"  errors ({name}): {result['errors']}")
    ratio = len(flat["opp"]) / len(flat["bare"]) if flat["bare"] else float("nan")
    return ratio, pct(flat["opp"], 0.99)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--patients", type=int, default=200)
    parser.add_argument("--images", type=int, default=3, help="images per patient (VIEW_DATA lists them)")
    parser.add_argument("--rate", type=float, default=25.0, help="requests/s of the paced run (0: skip it)")
    parser.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--pg", help="PostgreSQL server URL for --store postgresql (default: throwaway)")
    parser.add_argument("--serve-bare", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    parser.add_argument("--references", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve_bare:
        serve_bare(args.serve_bare)
        return
    if args.load:
        print(json.dumps(asyncio.run(load(args))))
        return

    home = Path(tempfile.mkdtemp(prefix="bench-oppweb-"))
    try:
        benchmark(args, home)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def benchmark(args: argparse.Namespace, home: Path) -> None:
    """Start the baseline and the daemons, seed the store, run the loads, print the report."""
    bare_port = free_port()
    bare_proc = subprocess.Popen([sys.executable, __file__, "--serve-bare", str(bare_port)])
    daemons: list[subprocess.Popen[bytes]] = []
    try:
        with store(args, home) as store_url:
            daemon, api, opp_url, token = start_daemon(home, store_url)
            daemons.append(daemon)
            started = time.perf_counter()
            references = seed(api, opp_url, token, args.patients, args.images)
            seeded = time.perf_counter() - started
            uncached, _api, uncached_url, _token = start_daemon(home, store_url, memo=False, name="no-memo")
            daemons.append(uncached)
            bare_url = f"http://127.0.0.1:{bare_port}/opp"
            wait_http(bare_url)

            def all_three(rate: float) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
                return (
                    run_load(bare_url, bare_proc.pid, references, args, rate),
                    run_load(opp_url, daemon.pid, references, args, rate),
                    run_load(uncached_url, uncached.pid, references, args, rate),
                )

            closed = all_three(0)
            paced = all_three(args.rate) if args.rate > 0 else None
            print(
                f"OPP web benchmark: {args.clients} clients, {args.seconds:g} s measured after"
                f" {args.warmup:g} s warm-up; {args.patients} patients x {args.images} images (seeded in"
                f" {seeded:.1f} s); store {args.store}; {os.cpu_count()} CPUs, load average"
                f" {os.getloadavg()[0]:.1f} at the end"
            )
            ratio, p99 = table("closed loop (saturation), the issue's targets:", *closed)
            print(
                f"=> throughput OPP web / bare: {ratio:.2f} (target >= 0.5: {verdict(ratio >= 0.5)});"
                f" OPP web p99 {p99:.1f} ms (target <= 25 ms: {verdict(p99 <= 25)})"
            )
            if paced is not None:
                table(f"paced at {args.rate:g} requests/s in all:", *paced)
    finally:
        bare_proc.terminate()
        bare_proc.wait(10)
        for process in daemons:
            process.terminate()
            process.wait(30)


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


if __name__ == "__main__":
    main()
