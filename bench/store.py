"""Store benchmark: 100,000 patients and 1,000,000 images (synthetic), on SQLite and PostgreSQL.

Prints p50/p99 of the three reads every PMS request starts with, through the real service (a worker-thread
hop, SQLAlchemy, the audit queue): lookup by PMS id, lookup by chart number, a 100-image list. Each is shown
next to the same query through the bare database driver in the same run (the baseline), as a ratio.
Targets (issue 2, 2 cores): lookups p99 <= 2 ms, list p99 <= 10 ms.

    python bench/store.py [--patients 100000] [--images-per-patient 100] [--with-images 10000]
                          [--samples 2000] [--pg URL] [--only sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import insert

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge.audit import AuditLog
from bridge.config import PmsSettings, load_settings
from bridge.events import EventBus
from bridge.model import Origin
from bridge.service import BridgeService, name_key
from bridge.store.db import Database, upgrade_schema
from bridge.store.models import ChartAlias, Image, Patient, PmsLink, Series, Study
from tests.support.pg import create_database, throwaway_cluster

BATCH = 10_000
ORIGIN = Origin("bench", "api", "BENCH")


def fill(db: Database, patients: int, with_images: int, per_patient: int) -> float:
    """Insert the synthetic practice in batches; returns seconds taken."""
    started = time.perf_counter()
    now = datetime.now(UTC)
    rng = random.Random(7)
    for first in range(1, patients + 1, BATCH):
        ids = range(first, min(first + BATCH, patients + 1))
        rows = [
            {
                "id": i,
                "last_name": f"Name{i}",
                "first_name": "Pat",
                "middle_name": "",
                "title": "",
                "name_key": name_key(f"Name{i}", "Pat"),
                "birth_date": datetime(1950, 1, 1).date() + timedelta(days=i % 20000),
                "sex": "MF"[i % 2],
                "street": "",
                "city": "",
                "postal_code": "",
                "phone": "",
                "email": "",
                "created_at": now,
                "updated_at": now,
            }
            for i in ids
        ]
        links = [
            {
                "patient_id": i,
                "pms_system": "PVS1",
                "practice_key": "",
                "practice_id": "",
                "pms_id": f"{i:07d}",
                "protocol": "vdds",
                "created_at": now,
                "last_seen_at": now,
            }
            for i in ids
        ]
        charts = [{"patient_id": i, "chart_number": f"CH{i:07d}", "created_at": now} for i in ids]
        db.write_sync(
            functools.partial(_insert_all, tables=[(Patient, rows), (PmsLink, links), (ChartAlias, charts)])
        )
    image_id = 0
    for first in range(1, with_images + 1, BATCH // per_patient or 1):
        owners = range(first, min(first + (BATCH // per_patient or 1), with_images + 1))
        studies = [
            {
                "id": p,
                "patient_id": p,
                "study_uid": f"2.25.{p}",
                "description": "",
                "accession_number": "",
                "created_at": now,
            }
            for p in owners
        ]
        series = [
            {
                "id": p,
                "study_id": p,
                "series_uid": f"2.25.9{p}",
                "modality": "IO",
                "description": "",
                "created_at": now,
            }
            for p in owners
        ]
        images = []
        for p in owners:
            for k in range(per_patient):
                image_id += 1
                images.append(
                    {
                        "id": image_id,
                        "patient_id": p,
                        "series_id": p,
                        "sop_instance_uid": f"2.25.8{image_id}",
                        "sha256": f"{image_id:064x}",
                        "file_ext": "png",
                        "media_type": "image/png",
                        "size_bytes": 1,
                        "category": "intraoral-xray",
                        "tooth_numbers": [11 + k % 8],
                        "rotation": 0,
                        "mirrored": False,
                        "width": 1300,
                        "height": 1000,
                        "frames": 1,
                        "bits_stored": 12,
                        "color": False,
                        "captured_at": datetime(2020, 1, 1) + timedelta(minutes=rng.randrange(2_000_000)),
                        "imported_at": now,
                        "device": "",
                        "comment": "",
                        "attributes": {},
                    }
                )
        db.write_sync(
            functools.partial(_insert_all, tables=[(Study, studies), (Series, series), (Image, images)])
        )
    return time.perf_counter() - started


def _insert_all(session: Any, tables: list[tuple[Any, list[dict[str, Any]]]]) -> None:
    for model, rows in tables:
        if rows:
            session.execute(insert(model), rows)


async def timed(fn: Callable[[], Awaitable[Any]], samples: int) -> list[float]:
    out = []
    for _ in range(samples):
        start = time.perf_counter()
        await fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def timed_sync(fn: Callable[[], Any], samples: int) -> list[float]:
    out = []
    for _ in range(samples):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def pct(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]
    )


def run_next(
    bare: Callable[[str, tuple[Any, ...]], Any], sql: str, queue: Iterator[tuple[object, ...]]
) -> Any:
    """One bare-driver query with the next of its sampled arguments."""
    return bare(sql, next(queue))


def bare_driver(url: str) -> Callable[[str, tuple[Any, ...]], Any]:
    """Run one query through the bare driver (sqlite3 / psycopg), no pool, no ORM, no thread hop."""
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), check_same_thread=False)

        def run_sqlite(sql: str, args: tuple[Any, ...]) -> Any:
            return conn.execute(sql.replace("%s", "?"), args).fetchall()

        return run_sqlite
    import psycopg

    pconn = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)

    def run_pg(sql: str, args: tuple[Any, ...]) -> Any:
        return pconn.execute(sql, args).fetchall()

    return run_pg


BASELINE_SQL = {
    "lookup by PMS id": (
        "SELECT p.* FROM patients p JOIN pms_links l ON l.patient_id = p.id"
        " WHERE l.pms_system = %s AND l.pms_id = %s"
    ),
    "lookup by chart number": (
        "SELECT p.* FROM patients p JOIN chart_aliases c ON c.patient_id = p.id"
        " WHERE c.chart_number = %s AND c.retired_at IS NULL"
    ),
    "100-image list": (
        "SELECT i.*, s.series_uid, t.study_uid FROM images i JOIN series s ON i.series_id = s.id"
        " JOIN studies t ON s.study_id = t.id WHERE i.patient_id = %s"
        " ORDER BY i.captured_at DESC, i.id DESC LIMIT 100"
    ),
}


async def measure(url: str, args: argparse.Namespace) -> None:
    db = Database(url, threads=4)
    upgrade_schema(db.engine)
    seconds = fill(db, args.patients, args.with_images, args.images_per_patient)
    total_images = args.with_images * args.images_per_patient
    print(f"\n{db.dialect}: filled {args.patients:,} patients and {total_images:,} images in {seconds:.0f} s")
    if db.dialect == "postgresql":
        with db.engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE")
            conn.commit()
    service = BridgeService(db, PmsSettings(**_pms_defaults()), EventBus(), AuditLog(db))
    rng = random.Random(1)
    bare = bare_driver(url)
    cases: list[tuple[str, Callable[[], Awaitable[Any]], tuple[Any, ...]]] = []

    def pick() -> int:
        return rng.randrange(1, args.patients + 1)

    def pick_imaged() -> int:
        return rng.randrange(1, args.with_images + 1)

    pms_ids = [pick() for _ in range(args.samples)]
    charts = [pick() for _ in range(args.samples)]
    imaged = [pick_imaged() for _ in range(args.samples)]
    it = {"pms": itertools.cycle(pms_ids), "chart": itertools.cycle(charts), "list": itertools.cycle(imaged)}
    cases = [
        (
            "lookup by PMS id",
            lambda: service.search_patients(ORIGIN, pms_system="PVS1", pms_id=f"{next(it['pms']):07d}"),
            (),
        ),
        (
            "lookup by chart number",
            lambda: service.search_patients(ORIGIN, chart_number=f"CH{next(it['chart']):07d}"),
            (),
        ),
        ("100-image list", lambda: service.list_images(ORIGIN, next(it["list"]), limit=100), ()),
    ]
    base_args: dict[str, list[tuple[object, ...]]] = {
        "lookup by PMS id": [("PVS1", f"{i:07d}") for i in pms_ids],
        "lookup by chart number": [(f"CH{i:07d}",) for i in charts],
        "100-image list": [(i,) for i in imaged],
    }
    head = f"{'read':<24}{'p50 ms':>9}{'p99 ms':>9}   {'driver p50':>10}{'driver p99':>11}"
    print(f"{head}   {'ratio p99':>9}   target")
    for name, call, _ in cases:
        await call()  # warm caches and the thread pool
        got = await timed(call, args.samples)
        queue = iter(base_args[name])
        sql = BASELINE_SQL[name]
        baseline = timed_sync(functools.partial(run_next, bare, sql, queue), args.samples)
        target = 10.0 if "list" in name else 2.0
        p50, p99, b50, b99 = pct(got, 50), pct(got, 99), pct(baseline, 50), pct(baseline, 99)
        verdict = "ok" if p99 <= target else "MISSED"
        row = f"{name:<24}{p50:>9.3f}{p99:>9.3f}   {b50:>10.3f}{b99:>11.3f}   {p99 / b99:>8.1f}x"
        print(f"{row}   p99 <= {target} ms {verdict}")
    db.close()


def _pms_defaults() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as home:
        config = Path(home) / "pms-bridge.ini"
        config.write_text("", encoding="utf-8")
        return dict(load_settings(str(config)).pms.__dict__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=100_000)
    parser.add_argument("--with-images", type=int, default=10_000, help="patients that have images")
    parser.add_argument("--images-per-patient", type=int, default=100)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--pg", help="PostgreSQL server URL (default: a throwaway cluster)")
    parser.add_argument("--only", choices=["sqlite", "postgresql"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.only != "postgresql":
            asyncio.run(measure(f"sqlite:///{tmp}/bench.db", args))
        if args.only != "sqlite":
            if args.pg:
                asyncio.run(measure(create_database(args.pg, f"bench_{int(time.time())}"), args))
            else:
                with throwaway_cluster() as server:
                    asyncio.run(measure(create_database(server, "bench"), args))


if __name__ == "__main__":
    main()
