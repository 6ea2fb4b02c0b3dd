"""Writing and reading an import's files past the operating system's page cache (Linux `O_DIRECT`).

Why: a buffered write copies every byte into page-cache memory the kernel must first find and map; on
the practice's server that is most of the CPU an import spends per file (measured in docs/dicom.md,
"Performance": 1 to 5 ms of system time for a 3 MB X-ray, against about 0.3 ms written directly, the disk
controller reading the bytes itself), and a migration of many gigabytes would push the thumbnails and
database pages that PMSs read out of the cache for files nobody reads soon. A direct write needs its
memory, file offset and length aligned to the disk's block size: the bytes go through a block-aligned
buffer in whole blocks, and the last partial block is written buffered. A file written so is read back
the same way (an upload, checked by a pool worker after the daemon received it): a buffered read would
bring every page back into the cache.

Durability is unchanged: a direct write may still sit in the disk's own cache, so the file is flushed
(`fsync`) before it is referenced, exactly as a buffered one (bridge.store.files).

Where direct writes are not available (Windows, macOS, a file system without them such as an older
tmpfs, or a share that refuses them), the file is written and read buffered, with the same result.
"""

from __future__ import annotations

import mmap
import os
import threading

ALIGN = 4096  # covers 512-byte and 4 KiB block devices
_CHUNK = 8 << 20  # an aligned buffer; a larger file is written and read in several direct calls
_KEPT = 8  # buffers kept for reuse: one per pool worker, upload being received, or thread staging files
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)
_O_BINARY: int = getattr(os, "O_BINARY", 0)
_free: list[mmap.mmap] = []
_free_lock = threading.Lock()


def _take() -> mmap.mmap:
    """A block-aligned buffer (anonymous mappings start on a page boundary). Buffers are reused, so that
    their pages are mapped once per process and not once per file."""
    with _free_lock:
        if _free:
            return _free.pop()
    return mmap.mmap(-1, _CHUNK)


def _give(buf: mmap.mmap) -> None:
    with _free_lock:
        if len(_free) < _KEPT:
            _free.append(buf)
            return
    buf.close()


def _set_direct(fd: int, on: bool) -> bool:
    """Switch direct transfers on or off for `fd`; False when the file system does not offer them."""
    if not _O_DIRECT:
        return False
    import fcntl

    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, (flags | _O_DIRECT) if on else (flags & ~_O_DIRECT))
    except OSError:
        return False
    return True


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


class NewFile:
    """A new file (`path` must not exist) written in pieces, not flushed: the caller flushes it before the
    file is referenced. Whole blocks go directly where the file system allows, the rest buffered. Used as
    a context manager: on an exception the partial file is removed. Not for two threads at once, but it
    may move between threads (an upload written by whichever thread the event loop's pool gives)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o644)
        self._direct = _set_direct(self._fd, True)
        self._buf: mmap.mmap | None = None
        self._fill = 0  # bytes waiting in the buffer, at most a partial block between writes
        self._closed = False

    def __enter__(self) -> NewFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        if not self._direct:
            _write_all(self._fd, view)
            return
        if self._buf is None:
            self._buf = _take()
        while view:
            n = min(_CHUNK - self._fill, len(view))
            self._buf[self._fill : self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            self._write_blocks()
            if not self._direct:  # refused on the way: the rest of the data follows buffered
                _write_all(self._fd, view)
                return

    def _write_blocks(self) -> None:
        """Write the buffer's whole blocks directly and keep the partial one; on a refusal (a device or
        share that takes the flag but not the write: EINVAL; anything else, such as a full disk, is raised
        by the buffered write too) or a short write off a block boundary, the rest goes buffered."""
        assert self._buf is not None
        whole = self._fill - self._fill % ALIGN
        done = 0
        with memoryview(self._buf) as aligned:
            try:
                while done < whole:
                    written = os.write(self._fd, aligned[done:whole])
                    done += written
                    if written % ALIGN:
                        break
            except OSError:
                pass
            if done < whole:
                self._direct = False
                _set_direct(self._fd, False)
                _write_all(self._fd, aligned[done : self._fill])
                self._fill = 0
                return
            tail = self._fill - whole
            self._buf[:tail] = self._buf[whole : self._fill]
            self._fill = tail

    def close(self) -> None:
        """Write the last partial block (buffered) and close the file."""
        try:
            if self._fill:
                assert self._buf is not None
                _set_direct(self._fd, False)
                with memoryview(self._buf) as aligned:
                    _write_all(self._fd, aligned[: self._fill])
                self._fill = 0
        except BaseException:
            self.abort()
            raise
        self._release()
        self._closed = True
        os.close(self._fd)

    def abort(self) -> None:
        """Close (unless closed) and remove the partial file."""
        self._release()
        if not self._closed:
            self._closed = True
            os.close(self._fd)
        try:  # noqa: SIM105 - the same shape as bridge.atomic
            os.unlink(self.path)
        except OSError:
            pass

    def _release(self) -> None:
        if self._buf is not None:
            _give(self._buf)
            self._buf = None


def write_new(path: str | os.PathLike[str], data: bytes) -> None:
    """Create `path` (which must not exist) holding `data`, not flushed (see NewFile)."""
    with NewFile(path) as new:
        new.write(data)


def read_whole(fd: int, size: int, *, direct: bool = True) -> bytes:
    """The first `size` bytes of the open file `fd` (as fstat gave its size; fewer if it shrank since).
    `direct`: read past the page cache where the file system allows, else buffered from where the direct
    reads stopped; False: buffered (a user's file, which may well be in the cache already)."""
    if not direct or size < ALIGN or not _set_direct(fd, True):
        return _read_buffered(fd, size, [])
    pieces: list[bytes] = []
    got = 0
    buf = _take()
    try:
        with memoryview(buf) as aligned:
            while got < size:
                want = min(_CHUNK, (size - got + ALIGN - 1) // ALIGN * ALIGN)
                try:
                    n = os.readv(fd, [aligned[:want]])
                except OSError:  # a device refusing direct reads (EINVAL): the rest is read buffered
                    break
                pieces.append(bytes(aligned[: min(n, size - got)]))
                got += n
                if n % ALIGN or n == 0:  # the end of the file
                    return _joined(pieces)
            else:
                return _joined(pieces)
    finally:
        _give(buf)
    _set_direct(fd, False)
    return _read_buffered(fd, size - got, pieces)


def _joined(pieces: list[bytes]) -> bytes:
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def _read_buffered(fd: int, size: int, pieces: list[bytes]) -> bytes:
    """`pieces` and then up to `size` more bytes (to the end of the file), read buffered."""
    while size > 0 and (chunk := os.read(fd, size)):
        pieces.append(chunk)
        size -= len(chunk)
    return b"".join(pieces)
