"""The content-addressed image file store: `images/ab/cd/<sha256>.<ext>`, written once, never modified.

Writes are atomic (a temporary file in the same folder, fsync, rename), so a crash or a full disk never
leaves a half-written file under a final name; the SHA-256 in the file name is the integrity hash that
`pms-bridge reconcile` re-checks.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from bridge.atomic import write_atomic

_CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class FileStore:
    """Image files by content hash under one root folder (a local folder or a share)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_for(self, sha256: str, ext: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
        if not ext.isalnum() or len(ext) > 10:
            raise ValueError(f"bad file extension: {ext!r}")
        return self.root / sha256[:2] / sha256[2:4] / f"{sha256}.{ext.lower()}"

    def put(self, data: bytes, ext: str) -> tuple[str, Path]:
        """Store `data` (idempotent: the same bytes give the same file) and return (sha256, path)."""
        digest = sha256_bytes(data)
        path = self.path_for(digest, ext)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data)
        return digest, path

    def adopt(self, path: Path, sha256: str, ext: str) -> Path:
        """Move a complete file the bridge wrote itself (a received upload, on this store's file system)
        in under its hash, with `put`'s guarantee: flushed to disk, then renamed. When the store already
        holds those bytes, `path` is left where it is. Saves writing the same bytes a second time.
        """
        target = self.path_for(sha256, ext)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(path, target)
        return target

    def verify(self, sha256: str, ext: str) -> str | None:
        """None when the file is present and intact, else what is wrong (for reconcile and readiness)."""
        path = self.path_for(sha256, ext)
        if not path.exists():
            return "missing"
        actual = sha256_file(path)
        return None if actual == sha256 else f"hash mismatch ({actual})"

    def check_writable(self) -> None:
        """Raise OSError if the root cannot be written (a share that disappeared, a read-only mount)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".probe.", dir=self.root)
        os.close(fd)
        os.unlink(tmp)
