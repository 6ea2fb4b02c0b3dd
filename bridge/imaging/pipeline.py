"""The event-loop side of imaging: a process pool for decoding and rendering, the thumbnail cache."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import multiprocessing
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from bridge.atomic import write_atomic
from bridge.config import ThumbnailSettings
from bridge.imaging.analyze import Analysis, analyze
from bridge.imaging.render import render_jpeg
from bridge.model import ImageView, NewImage
from bridge.store.files import FileStore

T = TypeVar("T")


class Imaging:
    """Ingests image bytes into the file store and serves cached watermarked thumbnails.

    Decoding never runs on the event loop: a JPEG 2000 decode takes hundreds of milliseconds.
    """

    def __init__(
        self, files: FileStore, thumbnails: ThumbnailSettings, cache_dir: Path, *, workers: int = 2
    ) -> None:
        self.files = files
        self.settings = thumbnails
        self.cache_dir = cache_dir
        self._workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self.watermark_version = hashlib.sha256(thumbnails.watermark.encode()).hexdigest()[:12]

    def _executor(self) -> ProcessPoolExecutor:
        """The process pool, started on first use (a command that never renders never pays for it)."""
        if self._pool is None:
            method = "forkserver" if sys.platform.startswith("linux") else "spawn"
            self._pool = ProcessPoolExecutor(self._workers, mp_context=multiprocessing.get_context(method))
        return self._pool

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn` in the process pool (it and its arguments must pickle)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor(), functools.partial(fn, *args, **kwargs))

    async def ingest(self, data: bytes, **metadata: object) -> NewImage:
        """Check and describe `data` (in the pool), store it, and return the image to add."""
        facts: Analysis = await self._run(analyze, data)
        sha256, _path = await asyncio.to_thread(self.files.put, data, facts.file_ext)
        fields: dict[str, object] = {
            "category": facts.category,
            "frames": facts.frames,
            "attributes": facts.attributes,
        }
        fields.update({k: v for k, v in metadata.items() if v is not None})
        return NewImage(
            sha256=sha256,
            file_ext=facts.file_ext,
            media_type=facts.media_type,
            size_bytes=len(data),
            width=facts.width,
            height=facts.height,
            bits_stored=facts.bits_stored,
            color=facts.color,
            **fields,  # type: ignore[arg-type]
        )

    def thumbnail_path(self, image: ImageView, size: int) -> Path:
        name = f"{image.sha256}_{size}_{image.rotation}_{int(image.mirrored)}_{self.watermark_version}.jpg"
        return self.cache_dir / image.sha256[:2] / name

    async def thumbnail(self, image: ImageView, size: int | None = None) -> Path:
        """The cached watermarked thumbnail of `image`, rendered now if it is not cached yet."""
        size = size or self.settings.size
        path = self.thumbnail_path(image, size)
        if path.exists():
            return path
        source = str(self.files.path_for(image.sha256, image.file_ext))
        data: bytes = await self._run(
            render_jpeg,
            source,
            rotation=image.rotation,
            mirrored=image.mirrored,
            size=size,
            watermark=self.settings.watermark,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(write_atomic, path, data)
        return path

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
