"""`pms-bridge reconcile`: every image row's file is present and hashes to its SHA-256."""

from __future__ import annotations

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from bridge.config import ConfigError, Settings, init_home_of
from bridge.store import queries as q
from bridge.store.db import Database, DatabaseFileMissing, current_revision, schema_problem, unreachable
from bridge.store.files import FileStore


def reconcile(settings: Settings) -> int:
    """Print one line per damaged or missing file and a summary; exit 1 when anything is wrong. A store
    it cannot reach, whose SQLite file is missing (it never makes a new store) or whose schema is not
    this release's (it never migrates), is one line (exit 2)."""
    try:
        db = Database(settings.store.url, threads=1, create=False, home=init_home_of(settings))
    except DatabaseFileMissing as exc:
        raise ConfigError(str(exc)) from None
    files = FileStore(settings.store.images)
    checked = bad = 0
    after = 0
    try:
        _check_schema(db, settings)
        while True:

            def page(session: Session, after_id: int = after) -> list[tuple[int, str, str]]:
                return [tuple(row) for row in session.execute(q.all_image_hashes(after_id))]  # type: ignore[misc]

            rows = db.read_sync(page)
            if not rows:
                break
            for image_id, sha256, ext in rows:
                checked += 1
                problem = files.verify(sha256, ext)
                if problem:
                    bad += 1
                    print(f"image {image_id}: {files.path_for(sha256, ext)}: {problem}")
            after = rows[-1][0]
    finally:
        db.close()
    print(f"{checked} images checked, {bad} with a missing or damaged file")
    return 1 if bad else 0


def _check_schema(db: Database, settings: Settings) -> None:
    """Reachable and at this release's schema, else one line (its queries are this release's)."""
    try:
        revision = current_revision(db.engine)
    except SQLAlchemyError as exc:
        raise ConfigError(unreachable(settings.store.url, exc)) from None
    problem = schema_problem(
        settings.store.url, revision, migrate=settings.store.migrate, home=init_home_of(settings)
    )
    if problem is not None:
        raise ConfigError(problem)
