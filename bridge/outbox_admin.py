"""What the outbox holds, for the admin: `/metrics`, `pms-bridge doctor` and `pms-bridge outbox list|retry`.

A push that cannot be delivered is retried with backoff for about 44 hours (50 attempts) and then given
up ("failed"); a daemon that died holding a message leaves it "sending" until another daemon takes it over.
Neither makes the daemon unready (it still answers every PMS), so both are shown here instead: counts per
channel and state, the age of the oldest waiting message, and a command that makes failed messages
pending again once the cause is fixed (a share back after a weekend).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from bridge.audit import AuditLog
from bridge.config import ConfigError, Settings, init_home_of, load_settings
from bridge.handlers.vdds_push import push_channels
from bridge.model import Origin
from bridge.store import queries as q
from bridge.store.models import OutboxMessage
from bridge.store.types import utcnow
from bridge.thumbfolders import channel_name, enabled_profiles

if TYPE_CHECKING:
    import argparse

    from bridge.store.db import Database

WAITING_STATES = ("pending", "sending", "failed")
LISTED_FAILURES = 20  # `outbox list` shows this many failed messages with their errors


@dataclass(frozen=True)
class OutboxCount:
    """How many messages of one channel are in one state, and since when the oldest has waited."""

    channel: str
    state: str
    count: int
    oldest_created: datetime
    oldest_claim: datetime | None

    def age_seconds(self, now: datetime) -> float:
        """Pending and failed: since the oldest was written; sending: since its claim began."""
        since = self.oldest_claim if self.state == "sending" and self.oldest_claim else self.oldest_created
        return max((now - since).total_seconds(), 0.0)


def outbox_counts(session: Session, *, include_done: bool = False) -> list[OutboxCount]:
    """Per channel and state; delivered messages only when asked (they are kept, and only grow)."""
    return [
        OutboxCount(channel, state, count, oldest_created, oldest_claim)
        for channel, state, count, oldest_created, oldest_claim in session.execute(
            q.outbox_summary(include_done)
        )
    ]


def per_channel(rows: Sequence[OutboxCount]) -> str:
    """`2 vdds-push, 1 dentrix-thumbnails messages`: one warning names every channel concerned."""
    total = sum(row.count for row in rows)
    return ", ".join(f"{row.count} {row.channel}" for row in rows) + (
        " message" if total == 1 else " messages"
    )


def worker_channels(settings: Settings) -> list[str]:
    """The channels a daemon with these settings runs an outbox worker for."""
    return [*push_channels(settings, "vdds", ""), *(channel_name(n) for n, _p in enabled_profiles(settings))]


def retry_failed(session: Session, origin: Origin, channel: str | None) -> list[OutboxMessage]:
    """Make the failed messages (of one channel, or all) pending again, due now, their attempts counted
    afresh so that each gets the whole backoff again; each retry goes to the audit log with who asked."""
    now = utcnow()
    retried = list(session.scalars(q.failed_outbox(channel, True)))
    for msg in retried:
        AuditLog.change(
            session,
            origin,
            "outbox-retry",
            patient_id=msg.patient_id,
            detail=f"{msg.channel} message {msg.id}, failed after {msg.attempts} attempts",
        )
        msg.state, msg.attempts, msg.next_attempt_at = "pending", 0, now
    return retried


# --------------------------------------------------------------------------------------------------
# pms-bridge outbox list | retry


def run(ns: argparse.Namespace) -> int:
    """`pms-bridge outbox ACTION`: against the store directly, so it works while no daemon runs; a
    missing SQLite database file is one line, never a new, empty store."""
    from sqlalchemy.exc import SQLAlchemyError

    from bridge.store.db import Database, DatabaseFileMissing, current_revision, schema_problem, unreachable

    settings = load_settings(ns.config)
    try:
        db = Database(settings.store.url, threads=1, memo=False, create=False, home=init_home_of(settings))
    except DatabaseFileMissing as exc:
        raise ConfigError(str(exc)) from None
    try:
        problem = schema_problem(
            settings.store.url,
            current_revision(db.engine),
            migrate=settings.store.migrate,
            home=init_home_of(settings),
        )
        if problem is not None:  # this command never migrates: the daemon or init does
            raise ConfigError(problem)
        return list_outbox(db) if ns.action == "list" else retry(db, ns.channel)
    except SQLAlchemyError as exc:
        raise ConfigError(unreachable(settings.store.url, exc)) from None
    finally:
        db.close()


def list_outbox(db: Database) -> int:
    """One line per channel and state (with the oldest message's age), then the failed messages' errors."""
    now = utcnow()
    counts = db.read_sync(lambda session: outbox_counts(session, include_done=True))
    if not counts:
        print("the outbox is empty")
        return 0
    print(f"{'CHANNEL':28} {'STATE':8} {'COUNT':>7}  OLDEST")
    for row in counts:
        oldest = "" if row.state == "done" else _age(row.age_seconds(now))
        print(f"{row.channel:28} {row.state:8} {row.count:>7}  {oldest}")

    def failures(session: Session) -> list[tuple[int, str, int, str]]:
        rows = session.scalars(q.failed_outbox(None, False).limit(LISTED_FAILURES))
        return [(m.id, m.channel, m.attempts, m.last_error) for m in rows]

    for msg_id, channel, attempts, error in db.read_sync(failures):
        print(f"failed message {msg_id} ({channel}, {attempts} attempts): {error[:200]}")
    return 0


def retry(db: Database, channel: str | None) -> int:
    """Failed messages pending again, one line per channel; none failed is no error (exit 0)."""
    from bridge.dicom.commands import cli_origin  # who runs it: this machine and its user

    origin = replace(cli_origin("cli"), protocol="outbox")
    retried = db.write_sync(lambda session: [m.channel for m in retry_failed(session, origin, channel)])
    if not retried:
        print(f"no failed messages{f' in {channel}' if channel else ''}")
        return 0
    for name in sorted(set(retried)):
        print(
            f"{retried.count(name)} failed messages of {name} are pending again (a running daemon sends them)"
        )
    return 0


def _age(seconds: float) -> str:
    """An age as an admin reads it: seconds, minutes, hours or days."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
