"""The event-loop side of imaging: a process pool for decoding and rendering, and the thumbnail cache.

Cache layout (docs/imaging.md): `<cache_dir>/<sha256[:2]>/<key>.jpg` with the key
`<sha256>_<size>_<rotation>_<mirrored>_<version>`, where `version` hashes the watermark settings, the JPEG
quality and the renderer's RENDER_VERSION. A change of orientation or watermark therefore asks for a file
that does not exist yet and is rendered anew; stale files are never served. Recently served renderings
are also kept in memory (a small LRU by bytes), so the hot path of a PMS fetching 40 thumbnails touches
neither the disk nor the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bridge.config import ConfigError, ThumbnailSettings
from bridge.imaging import pool
from bridge.imaging.analyze import Analysis, ImagingError, new_image
from bridge.imaging.render import (
    FORMATS,
    RenderRequest,
    Watermark,
    analyze_and_render,
    render_file,
)
from bridge.model import ImageView, NewImage, Origin
from bridge.service import BridgeService
from bridge.store.files import FileStore, sha256_bytes

T = TypeVar("T")
log = logging.getLogger(__name__)

MEMORY_CACHE_BYTES = 48 * 1024 * 1024
EXPORT_JPEG_QUALITY = 95


@dataclass(frozen=True)
class Rendered:
    """A cached rendering: its bytes and the entity tag HTTP clients revalidate with."""

    etag: str
    data: bytes


def _load_logo(path: Path | None) -> bytes | None:
    """The watermark logo's bytes, checked once at start-up: a bad logo stops the daemon with a reason."""
    if path is None:
        return None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"[thumbnails] watermark_logo = {path}: cannot be read ({exc.strerror})") from None
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ConfigError(f"[thumbnails] watermark_logo = {path}: not a PNG file")
    return data


class Imaging:
    """Ingests image bytes into the file store and serves cached watermarked renderings.

    Decoding and rendering never run on the event loop: a JPEG 2000 decode takes hundreds of
    milliseconds, so they go to a process pool; file I/O goes to a thread.
    """

    def __init__(
        self, files: FileStore, thumbnails: ThumbnailSettings, cache_dir: Path, *, workers: int = 2
    ) -> None:
        self.files = files
        self.settings = thumbnails
        self.cache_dir = cache_dir
        self._workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self.watermark = Watermark(
            text=thumbnails.watermark,
            logo_png=_load_logo(thumbnails.watermark_logo),
            position=thumbnails.watermark_position,
            opacity=thumbnails.watermark_opacity,
        )
        # Everything but the image and its orientation that changes the bytes of a thumbnail.
        self.watermark_version = hashlib.sha256(
            f"{self.watermark.version}:{thumbnails.quality}".encode()
        ).hexdigest()[:12]
        self._memory: OrderedDict[str, bytes] = OrderedDict()
        self._memory_bytes = 0
        self._inflight: dict[str, asyncio.Future[bytes]] = {}
        # Stored files whose image rows are not committed yet, by hash (see `claim`).
        self._claims: Counter[str] = Counter()
        self._claims_lock = asyncio.Lock()

    # ---------------------------------------------------------------------------------------------
    # The pool

    def _executor(self) -> ProcessPoolExecutor:
        """The process pool, started on first use (a command that never renders never pays for it)."""
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self._workers, mp_context=pool.context(), initializer=pool.start_worker
            )
        return self._pool

    async def start_workers(self) -> list[int]:
        """Start every worker of the pool now; the process ids of those that answered (the log names them:
        an admin looking at the machine's processes tells the pool's workers from a fork server or a stray
        process). The pool otherwise forks its workers one by
        one as work arrives, so the first import or thumbnails after a start wait for workers being made
        while the files queue: the daemon calls this once its listeners are up, `pms-bridge import` at once
        (a running archive is warm; measured in docs/dicom.md, "Performance")."""
        pids = await asyncio.gather(*(self._run(pool.hold) for _ in range(self._workers)))
        return sorted(set(pids))

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn` in the process pool (it and its arguments must pickle).

        A worker that ends abruptly (the system's out-of-memory killer, a decoder crashing on a hostile
        file) breaks Python's process pool for good: every later task would fail at once, and the daemon
        would render and import nothing until restarted. The work then running fails
        (BrokenProcessPool), and the next task gets a new pool."""
        loop = asyncio.get_running_loop()
        executor = self._executor()
        try:
            return await loop.run_in_executor(executor, functools.partial(fn, *args, **kwargs))
        except BrokenProcessPool:
            if self._pool is executor:
                log.warning("an imaging worker ended abruptly; the pool is started again")
                self._pool = None
                executor.shutdown(wait=False, cancel_futures=True)
            raise

    async def run_in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` in the imaging process pool: CPU work of other packages (DICOM headers and
        volumes), so one pool sized to the machine serves all decoding."""
        return await self._run(fn, *args)

    # ---------------------------------------------------------------------------------------------
    # Ingest

    def _request(self, size: int, rotation: int, mirrored: bool) -> RenderRequest:
        return RenderRequest(size, rotation, mirrored, self.watermark, "JPEG", self.settings.quality)

    async def ingest(self, data: bytes, **metadata: object) -> NewImage:
        """Check and describe `data` (in the pool), store it, cache its thumbnail and preview.

        The file is decoded completely before anything is written, so a corrupt or truncated file
        raises ImagingError and leaves nothing behind. The thumbnail and preview are rendered from the
        same decode, with the orientation in `metadata`, so a PMS's first request is served from disk.
        The stored file is claimed (`claim`): the caller releases it once its image row is committed or
        given up.
        """
        rotation = metadata.get("rotation") or 0
        mirrored = bool(metadata.get("mirrored") or False)
        if not isinstance(rotation, int) or rotation not in (0, 90, 180, 270):
            raise ImagingError(f"rotation must be 0, 90, 180 or 270, got {rotation!r}")
        sizes = (self.settings.size, self.settings.preview_size)
        requests = [self._request(size, rotation, mirrored) for size in sizes]
        facts: Analysis
        facts, renders = await self._run(analyze_and_render, data, requests)
        sha256 = await asyncio.to_thread(sha256_bytes, data)
        await self.claim([sha256])  # released by the caller once its rows are committed or given up
        try:
            await asyncio.to_thread(self.files.put, data, facts.file_ext, sha256)
        except BaseException:
            self.release([sha256])
            raise
        for size, rendered in zip(sizes, renders, strict=True):
            key = self.render_key(sha256, size, rotation, mirrored)
            await asyncio.to_thread(self._write_cache, self._cache_path(sha256, key), rendered)
            self._remember(key, rendered)
        return new_image(facts, sha256, len(data), metadata)

    async def ingest_all(
        self,
        service: BridgeService,
        origin: Origin,
        patient_id: int,
        files: Sequence[tuple[str, bytes]],
        **metadata: object,
    ) -> list[ImageView]:
        """Ingest `files` (name, bytes) and add them to a patient, all or nothing.

        A bad file raises ImagingError naming it; when anything fails (a later bad file, the store
        refusing the images, a database error), the files this call wrote are removed again unless a
        stored image uses the same bytes.
        """
        new: list[NewImage] = []
        added = False
        try:
            for name, data in files:
                try:
                    new.append(await self.ingest(data, **metadata))
                except ImagingError as exc:
                    raise ImagingError(f"{name or 'file'}: {exc}") from None
            stored = [self.files.path_for(image.sha256, image.file_ext) for image in new]
            await asyncio.to_thread(self.files.make_durable, stored)  # before a row references them
            views = await service.add_images(origin, patient_id, new)
            added = True
            return views
        finally:
            self.release([n.sha256 for n in new])
            if new and not added:
                await self.discard(service, new)

    async def claim(self, sha256s: Iterable[str]) -> None:
        """Mark stored files as about to be referenced: written (or renamed) into place, their image rows
        not committed yet. Call it before the file goes into place, and `release` once the rows are
        committed or given up. A `discard` meanwhile keeps claimed files: another request (an upload of
        the same bytes, a retried DICOM file) failing beside this one must not remove a file this one is
        about to reference, which the store would then list with no file behind it."""
        async with self._claims_lock:
            self._claims.update(sha256s)

    def release(self, sha256s: Iterable[str]) -> None:
        """Give up claims taken by `claim` (once each)."""
        for sha256 in sha256s:
            self._claims[sha256] -= 1
            if self._claims[sha256] <= 0:
                del self._claims[sha256]

    async def discard(self, service: BridgeService, images: Iterable[NewImage]) -> None:
        """Remove the files (and cached renderings) of ingested images that could not be added, unless a
        stored image uses the same bytes or another request of this daemon has claimed them.

        The store must not keep orphan files. The check of the claims and of the store and the removal
        run under the lock `claim` takes, so no new claim slips in between. Known gap: a second daemon
        on the same image store does not see this one's claims.
        """
        async with self._claims_lock:
            unclaimed = {(img.sha256, img.file_ext) for img in images if self._claims[img.sha256] <= 0}
            if not unclaimed:
                return
            referenced = await service.referenced_hashes([sha256 for sha256, _ext in unclaimed])
            doomed = {(sha256, ext) for sha256, ext in unclaimed if sha256 not in referenced}
            for sha256, _ext in doomed:
                for key in [k for k in self._memory if k.startswith(sha256)]:
                    self._memory_bytes -= len(self._memory.pop(key))
            await asyncio.to_thread(self._remove_files, doomed)

    def _remove_files(self, doomed: set[tuple[str, str]]) -> None:
        for sha256, ext in doomed:
            with contextlib.suppress(FileNotFoundError):
                self.files.path_for(sha256, ext).unlink()
            for cached in (self.cache_dir / sha256[:2]).glob(f"{sha256}_*.jpg"):
                with contextlib.suppress(FileNotFoundError):
                    cached.unlink()

    # ---------------------------------------------------------------------------------------------
    # Cached renderings

    def render_key(self, sha256: str, size: int, rotation: int, mirrored: bool) -> str:
        """The cache key: (sha256, size, rotation, mirror, watermark version)."""
        return f"{sha256}_{size}_{rotation}_{int(mirrored)}_{self.watermark_version}"

    def _cache_path(self, sha256: str, key: str) -> Path:
        return self.cache_dir / sha256[:2] / f"{key}.jpg"

    def thumbnail_path(self, image: ImageView, size: int) -> Path:
        """Where the thumbnail of `image` at `size` is cached (it may not be rendered yet)."""
        return self._cache_path(
            image.sha256, self.render_key(image.sha256, size, image.rotation, image.mirrored)
        )

    @staticmethod
    def etag(key: str) -> str:
        return hashlib.blake2b(key.encode(), digest_size=12).hexdigest()

    def etag_for(self, image: ImageView, size: int) -> str:
        """The entity tag of a rendering, known without reading it (for If-None-Match)."""
        return self.etag(self.render_key(image.sha256, size, image.rotation, image.mirrored))

    async def thumbnail(self, image: ImageView, size: int | None = None) -> Path:
        """The cached watermarked thumbnail of `image`, rendered now if it is not cached yet."""
        size = size or self.settings.size
        rendered = await self.rendered(image, size)
        path = self.thumbnail_path(image, size)
        if not await asyncio.to_thread(path.exists):  # served from memory, the file was cleaned away
            await asyncio.to_thread(self._write_cache, path, rendered.data)
        return path

    async def preview(self, image: ImageView) -> Path:
        """The cached watermarked preview (long edge `[thumbnails] preview_size`) of `image`."""
        return await self.thumbnail(image, self.settings.preview_size)

    async def rendered(self, image: ImageView, size: int | None = None) -> Rendered:
        """The bytes and entity tag of the watermarked JPEG of `image` with long edge `size`.

        Memory first, then the disk cache, then a render in the pool; concurrent requests for the same
        rendering share one render.
        """
        size = size or self.settings.size
        key = self.render_key(image.sha256, size, image.rotation, image.mirrored)
        data = self._memory.get(key)
        if data is not None:
            self._memory.move_to_end(key)
            return Rendered(self.etag(key), data)
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(self._load(image, size, key))
            self._inflight[key] = future
            future.add_done_callback(lambda _f: self._inflight.pop(key, None))
        data = await asyncio.shield(future)
        return Rendered(self.etag(key), data)

    async def _load(self, image: ImageView, size: int, key: str) -> bytes:
        path = self._cache_path(image.sha256, key)
        cached = await asyncio.to_thread(self._read_cache, path)
        if cached is not None:
            data = cached
        else:
            source = self.files.path_for(image.sha256, image.file_ext)
            request = self._request(size, image.rotation, image.mirrored)
            try:
                (data,) = await self._run(render_file, str(source), [request])
            except FileNotFoundError:
                raise ImagingError(f"the file of image {image.id} is missing from the image store") from None
            await asyncio.to_thread(self._write_cache, path, data)
        self._remember(key, data)
        return data

    async def export_bytes(self, image: ImageView, fmt: str, *, watermark: bool) -> bytes:
        """The whole image, display-mapped and oriented, as JPG, PNG or TIF bytes (e.g. VDDS exports).

        Not cached: exports are rare and large. `watermark=True` stamps it like a thumbnail.
        """
        if fmt.upper() not in FORMATS:
            raise ValueError(f"export format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        request = RenderRequest(
            None,
            image.rotation,
            image.mirrored,
            self.watermark if watermark else None,
            fmt.upper(),
            EXPORT_JPEG_QUALITY,
        )
        source = self.files.path_for(image.sha256, image.file_ext)
        (data,) = await self._run(render_file, str(source), [request])
        return data

    def _remember(self, key: str, data: bytes) -> None:
        """Keep a rendering in the memory LRU, evicting the least recently used beyond the budget."""
        if len(data) > MEMORY_CACHE_BYTES // 16 or key in self._memory:
            return
        self._memory[key] = data
        self._memory_bytes += len(data)
        while self._memory_bytes > MEMORY_CACHE_BYTES:
            _old, evicted = self._memory.popitem(last=False)
            self._memory_bytes -= len(evicted)

    def _write_cache(self, path: Path, data: bytes) -> None:
        """Write a rendering: temporary file and rename, without the fsync originals get.

        A cached rendering can always be made again, and an fsync per thumbnail would halve the
        throughput of an import. A file torn by a power cut is caught when read (`_read_cache`).
        The cache folder is made only inside an existing folder: it lies in the image folder, which must
        not be recreated on the local disk when its share is gone (FileNotFoundError, a 503 to a client).
        """
        self.cache_dir.mkdir(exist_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{id(data):x}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    @staticmethod
    def _read_cache(path: Path) -> bytes | None:
        """A cached rendering, or None when it is missing or torn (no JPEG end-of-image marker)."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return data if data.endswith(b"\xff\xd9") else None

    def close(self, timeout: float | None = None) -> None:
        """Stop the pool: queued work is dropped, running work may finish; with `timeout`, workers still
        busy after that many seconds are ended (a decoder stuck on a hostile file must not keep a daemon
        from stopping; its service manager would otherwise have to kill it)."""
        if self._pool is None:
            return
        if timeout is None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            return
        # the executor's own record of its worker processes (stable since Python 3.8; no public one)
        workers = list((getattr(self._pool, "_processes", None) or {}).values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + timeout
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        for worker in workers:
            if worker.is_alive():
                log.warning("imaging worker still busy at shutdown; ended", extra={"pid": worker.pid})
                worker.kill()
                worker.join(5)
