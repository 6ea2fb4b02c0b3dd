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
from typing import Any

from sqlalchemy import Table, insert
from sqlalchemy.orm import Session

from bridge.model import Origin
from bridge.store.db import Database
from bridge.store.models import AuditEntry
from bridge.store.types import utcnow

log = logging.getLogger(__name__)
# The table, not the ORM entity: an executemany on the table skips the ORM's bulk machinery (a quarter of
# the cost per row, paid for every read a PMS makes).
AUDIT_TABLE: Table = AuditEntry.__table__  # type: ignore[assignment]


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
    MAX_QUEUE = 100_000

    def __init__(self, db: Database) -> None:
        self._db = db
        # Plain rows, not ORM objects: a read is queued on the hot path of every thumbnail, and a batch
        # goes in as one executemany, so neither side pays for ORM instrumentation.
        self._pending: deque[dict[str, Any]] = deque()

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
        """Write every queued read now; returns how many were written."""
        if not self._pending:
            return 0
        batch = list(self._pending)
        self._pending.clear()

        def work(session: Session) -> None:
            session.execute(insert(AUDIT_TABLE), batch)

        try:
            await self._db.write(work, watched=False)
        except Exception:
            self._pending.extendleft(reversed(batch))  # keep them for the next attempt
            raise
        return len(batch)

    async def run(self) -> None:
        """Flush periodically until cancelled; a final flush happens in `Daemon.stop`."""
        while True:
            await asyncio.sleep(self.FLUSH_INTERVAL)
            try:
                await self.flush()
            except Exception:
                log.exception("audit flush failed; will retry")
