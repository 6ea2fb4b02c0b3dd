"""Everything a running daemon holds, built once from the settings and handed to every layer.

Tests build a Runtime the same way the daemon does, so they exercise the real wiring.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy.exc import SQLAlchemyError

from bridge.audit import AuditLog
from bridge.config import ConfigError, Settings, init_home_of
from bridge.events import EventBus
from bridge.imaging.pipeline import Imaging
from bridge.outbox import REFRESH_RULES, push_targets
from bridge.outbox_admin import WAITING_STATES, OutboxCount
from bridge.record import Recorder
from bridge.service import BridgeService
from bridge.store.db import (
    Database,
    DatabaseFileMissing,
    SchemaError,
    SchemaUpgrade,
    current_revision,
    remains_of_store,
    schema_problem,
    unreachable,
    upgrade_schema,
)
from bridge.store.files import FileStore


@dataclass
class Metrics:
    """Prometheus metrics of one daemon (a registry of its own, so tests can run several)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.http_requests = Counter(
            "pms_bridge_http_requests", "HTTP requests", ["listener", "route", "status"], registry=r
        )
        self.http_latency = Histogram(
            "pms_bridge_http_request_seconds",
            "HTTP request latency",
            ["listener"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
            registry=r,
        )
        self.launches = Counter(
            "pms_bridge_launches", "PMS launches handled", ["protocol", "exit"], registry=r
        )
        self.events = Counter("pms_bridge_events", "Events published", ["event"], registry=r)
        self.last_scan = Gauge(
            "pms_bridge_last_successful_scan_timestamp",
            "Last successful scan of a watched folder",
            ["watcher"],
            registry=r,
        )
        self.outbox_messages = Gauge(
            "pms_bridge_outbox_messages",
            "Pushes to PMSs waiting in the store's outbox (all daemons'), by channel and state",
            ["channel", "state"],
            registry=r,
        )
        self.outbox_oldest = Gauge(
            "pms_bridge_outbox_oldest_age_seconds",
            "Age of the oldest outbox message: pending since written, sending since claimed",
            ["channel", "state"],
            registry=r,
        )

    def show_outbox(
        self, channels: Sequence[str], counts: Sequence[OutboxCount] | None, now: datetime
    ) -> None:
        """Set the outbox gauges from a fresh count (`None`: the store did not answer, so none are shown
        rather than stale ones). `channels` (this daemon's) show 0 in every state when they hold nothing,
        so that an alert on failed > 0 has a series to watch."""
        self.outbox_messages.clear()
        self.outbox_oldest.clear()
        if counts is None:
            return
        for channel in channels:
            for state in WAITING_STATES:
                self.outbox_messages.labels(channel, state).set(0)
        for row in counts:
            self.outbox_messages.labels(row.channel, row.state).set(row.count)
            if row.state in ("pending", "sending"):
                self.outbox_oldest.labels(row.channel, row.state).set(row.age_seconds(now))


@dataclass
class Readiness:
    """What /readyz reports beyond the database: watched folders and when each was last scanned."""

    started_at: float = field(default_factory=time.time)
    last_scan: dict[str, float] = field(default_factory=dict)
    scan_errors: dict[str, str] = field(default_factory=dict)
    watched: dict[str, Path] = field(default_factory=dict)
    max_scan_age: dict[str, float] = field(default_factory=dict)

    def scanned(self, watcher: str) -> None:
        self.last_scan[watcher] = time.time()
        self.scan_errors.pop(watcher, None)


@dataclass
class Runtime:
    """The daemon's parts: settings, store, service, imaging, events, audit, metrics, readiness."""

    settings: Settings
    db: Database
    files: FileStore
    bus: EventBus
    audit: AuditLog
    service: BridgeService
    imaging: Imaging
    metrics: Metrics
    readiness: Readiness
    instance_id: str = field(default_factory=lambda: secrets.token_hex(4))
    recorder: Recorder | None = None
    schema_upgrade: SchemaUpgrade | None = None  # what this start did to the schema, if anything

    @classmethod
    def build(
        cls,
        settings: Settings,
        *,
        migrate: bool | None = None,
        imaging_workers: int = 2,
        create: bool = True,
    ) -> Runtime:
        """Connect to the store (migrating it when configured) and build every part.

        A store that cannot be reached, or whose schema this release cannot use as it is, is refused
        here with one line (ConfigError): a daemon started on an older schema with `[store] migrate = no`
        used to report itself started and ready and then fail every query that needs a newer column.

        `create`: a missing SQLite database file is made a new store (the daemon, on a fresh home),
        unless what is left of a lost store is there (`remains_of_store`); False for the commands,
        which refuse a missing file (DatabaseFileMissing) rather than make an empty store at its path.
        """
        url = settings.store.url
        remains = remains_of_store(url, settings.store.images) if create else None
        if remains is not None:
            raise ConfigError(remains)
        try:
            db = Database(
                url,
                threads=settings.store.db_threads,
                memo=settings.store.memo_reads,
                create=create,
                home=init_home_of(settings),
            )
        except DatabaseFileMissing as exc:
            raise ConfigError(str(exc)) from None
        try:
            upgrade = _schema_ready(db, settings, settings.store.migrate if migrate is None else migrate)
        except BaseException:
            db.close()
            raise
        files = FileStore(settings.store.images)
        if upgrade is not None and upgrade.from_revision is None:
            # nothing stored yet, so no share to miss: the image folder may be made, as init does
            files.create_root()
        bus = EventBus()
        audit = AuditLog(db)
        service = BridgeService(
            db,
            settings.pms,
            bus,
            audit,
            push_targets=push_targets(settings),
            refresh_targets=push_targets(settings, REFRESH_RULES),
        )
        imaging = Imaging(
            files, settings.thumbnails, settings.store.images / "thumbnails", workers=imaging_workers
        )
        metrics = Metrics()
        bus.subscribe(lambda event: metrics.events.labels(event.name).inc())
        rt = cls(
            settings, db, files, bus, audit, service, imaging, metrics, Readiness(), schema_upgrade=upgrade
        )
        if settings.record.dir is not None:
            rt.recorder = Recorder(rt, settings.record.dir, redact=settings.record.redact)
        return rt

    def close(self, timeout: float | None = None) -> None:
        """Close the pool (`timeout`: as Imaging.close) and the database."""
        self.imaging.close(timeout)
        self.db.close()


def _schema_ready(db: Database, settings: Settings, migrate: bool) -> SchemaUpgrade | None:
    """Bring the schema up to date (`migrate`), or check that it is; one line (ConfigError) otherwise."""
    url = settings.store.url
    try:
        if migrate:
            return upgrade_schema(db.engine)
        problem = schema_problem(url, current_revision(db.engine), migrate=False, home=init_home_of(settings))
    except SchemaError as exc:
        raise ConfigError(str(exc)) from None
    except SQLAlchemyError as exc:  # one line, not a driver's traceback
        raise ConfigError(unreachable(url, exc)) from None
    if problem is not None:
        raise ConfigError(problem)
    return None
