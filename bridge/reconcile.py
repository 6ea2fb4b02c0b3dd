"""`pms-bridge reconcile`: every image row's file is present and hashes to its SHA-256."""

from __future__ import annotations

from sqlalchemy.orm import Session

from bridge.config import Settings
from bridge.store import queries as q
from bridge.store.db import Database
from bridge.store.files import FileStore


def reconcile(settings: Settings) -> int:
    """Print one line per damaged or missing file and a summary; exit 1 when anything is wrong."""
    db = Database(settings.store.url, threads=1)
    files = FileStore(settings.store.images)
    checked = bad = 0
    after = 0
    try:
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
