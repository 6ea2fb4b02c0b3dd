"""The audit log: who (protocol, transport, workstation, token) read or changed which patient or image.

Changes are written in the same transaction as the change itself, so there is never a change without its
entry. Reads are queued and written in batches by a background task: a PMS asking for 40 thumbnails must
not pay 40 database writes, and a read that is never logged because the process died is far less harmful
than a slow read path. The queue is flushed on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, bindparam, insert
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session

from bridge.model import Origin
from bridge.store.db import Database, StoreFileLost
from bridge.store.models import AuditEntry
from bridge.store.types import utcnow

log = logging.getLogger(__name__)
AUDIT_TABLE: Table = AuditEntry.__table__  # type: ignore[assignment]
COLUMNS = (
    "at",
    "action",
    "protocol",
    "transport",
    "workstation",
    "actor",
    "request_id",
    "patient_id",
    "image_id",
    "detail",
)


@dataclass(frozen=True)
class _DriverInsert:
    """The audit INSERT as the driver takes it, with the columns' own bind processors (UtcDateTime's)."""

    sql: str
    positional: tuple[str, ...] | None  # parameter order for qmark/format drivers; None: named
    processors: dict[str, Callable[[Any], Any]]


_inserts: dict[str, _DriverInsert] = {}


def _driver_insert(dialect: Dialect) -> _DriverInsert:
    """Compiled once per dialect. A queued read is written by the driver's executemany: going through
    SQLAlchemy's per-row parameter handling cost ~15 us of Python per row, in a thread holding the GIL
    against the event loop: a flush of a few thousand reads stalled every answer by tens of ms."""
    found = _inserts.get(dialect.name)
    if found is None:
        compiled = (
            insert(AUDIT_TABLE).values({name: bindparam(name) for name in COLUMNS}).compile(dialect=dialect)
        )
        processors: dict[str, Callable[[Any], Any]] = {}
        for name in COLUMNS:
            processor = AUDIT_TABLE.c[name].type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                processors[name] = processor
        positional = tuple(compiled.positiontup or ()) if compiled.positional else None
        found = _inserts[dialect.name] = _DriverInsert(str(compiled), positional, processors)
    return found


def _insert_rows(session: Session, rows: list[dict[str, Any]]) -> None:
    conn = session.connection()
    plan = _driver_insert(conn.dialect)
    for name, processor in plan.processors.items():
        for row in rows:
            row[name] = processor(row[name])
    if plan.positional is None:
        conn.exec_driver_sql(plan.sql, rows)
    else:
        order = plan.positional
        conn.exec_driver_sql(plan.sql, [tuple(row[name] for name in order) for row in rows])


def _row(
    origin: Origin, action: str, patient_id: int | None, image_id: int | None, detail: str
) -> dict[str, Any]:
    return {
        "at": utcnow(),
        "action": action,
        "protocol": origin.protocol[:40],
        "transport": origin.transport[:20],
        "workstation": origin.workstation[:120],
        "actor": origin.actor[:120],
        "request_id": origin.request_id[:40],
        "patient_id": patient_id,
        "image_id": image_id,
        "detail": detail,
    }


class AuditLog:
    """Writes audit entries: changes inside the caller's transaction, reads through a batched queue."""

    FLUSH_INTERVAL = 0.5
    FLUSH_CHUNK = 500
    MAX_QUEUE = 100_000

    def __init__(self, db: Database) -> None:
        self._db = db
        # Plain rows, not ORM objects: a read is queued on the hot path of every thumbnail, and a batch
        # goes in as one executemany, so neither side pays for ORM instrumentation.
        self._pending: deque[dict[str, Any]] = deque()
        # One flush at a time: a flush that finds the queue empty while another is still writing the
        # batch it took must wait for that write, or "flush, then read the log" misses those rows.
        self._flushing = asyncio.Lock()

    @property
    def queued(self) -> int:
        """Reads waiting to be written."""
        return len(self._pending)

    @staticmethod
    def change(
        session: Session,
        origin: Origin,
        action: str,
        *,
        patient_id: int | None = None,
        image_id: int | None = None,
        detail: str = "",
    ) -> None:
        """Record a change in the transaction of `session` (committed or rolled back with it)."""
        session.add(AuditEntry(**_row(origin, action, patient_id, image_id, detail)))

    @staticmethod
    def image_changes(
        session: Session, origin: Origin, action: str, patient_id: int, image_ids: list[int]
    ) -> None:
        """Record the same change to many images of a patient in the transaction of `session`, as one
        executemany (an import batch's `image.add`: ORM objects cost ~0.1 ms of Python each)."""
        session.flush()  # the rows go in order after what the session holds
        _insert_rows(session, [_row(origin, action, patient_id, image_id, "") for image_id in image_ids])

    def read(
        self,
        origin: Origin,
        action: str,
        *,
        patient_id: int | None = None,
        image_id: int | None = None,
        detail: str = "",
    ) -> None:
        """Queue a read for the next batch."""
        if len(self._pending) >= self.MAX_QUEUE:
            log.error(
                "audit queue full; the database is not keeping up", extra={"queued": len(self._pending)}
            )
        self._pending.append(_row(origin, action, patient_id, image_id, detail))

    async def flush(self) -> int:
        """Write every queued read now, in transactions of at most FLUSH_CHUNK rows (a short job in the
        database thread at a time leaves the event loop the interpreter in between); returns how many
        were written."""
        written = 0
        async with self._flushing:
            while self._pending:
                batch = [self._pending.popleft() for _ in range(min(self.FLUSH_CHUNK, len(self._pending)))]

                def work(session: Session, batch: list[dict[str, Any]] = batch) -> None:
                    _insert_rows(session, [dict(row) for row in batch])  # copies: a retry starts afresh

                try:
                    await self._db.write(work, watched=False)
                except Exception:
                    self._pending.extendleft(reversed(batch))  # keep them for the next attempt
                    raise
                written += len(batch)
        return written

    async def run(self) -> None:
        """Flush periodically until cancelled; a final flush happens in `Daemon.stop`."""
        while True:
            await asyncio.sleep(self.FLUSH_INTERVAL)
            try:
                await self.flush()
            except StoreFileLost:
                pass  # logged once where it was found; the entries wait in the queue
            except Exception:
                log.exception("audit flush failed; will retry")
