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

A file read for an import is held in such a buffer (`Held`, `read_held`) and written from it (`write_new`):
the bytes are checked, hashed and written from the memory they were read into, never copied between the
read and the direct write (that copy cost about 0.5-0.8 ms of a 3 MB file's 5-6 ms under load, measured
with perf in docs/dicom.md, "Performance").

Durability is unchanged: a direct write may still sit in the disk's own cache, so the file is flushed
(`fsync`) before it is referenced, exactly as a buffered one (bridge.store.files).

Where direct writes are not available (Windows, macOS, a file system without them such as an older
tmpfs, or a share that refuses them), the file is written and read buffered, with the same result.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading

ALIGN = 4096  # covers 512-byte and 4 KiB block devices
_CHUNK = 8 << 20  # the most a direct read call asks for, and what a NewFile gathers before it writes
_KEPT = 8  # buffers a process keeps for reuse: a worker uses two (a file written, the next read), the
# daemon one per upload being received at once
_KEPT_SIZE = 16 << 20  # each kept buffer's size: a file up to this fits any of them (as bridge.allocator's
# heap keeps allocations up to 16 MiB). Only the pages a file touched are memory; the rest is address space.
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)
_O_BINARY: int = getattr(os, "O_BINARY", 0)
_free: list[mmap.mmap] = []
_free_lock = threading.Lock()


def _take(size: int = _CHUNK) -> mmap.mmap:
    """A block-aligned buffer (anonymous mappings start on a page boundary) of at least `size` bytes.
    Buffers of `_KEPT_SIZE` are reused, so that their pages are mapped once per process and not once per
    file, and a process has only as many as it used at once; a larger one is its caller's alone."""
    if size > _KEPT_SIZE:
        return mmap.mmap(-1, size)
    with _free_lock:
        if _free:
            return _free.pop()
    return mmap.mmap(-1, _KEPT_SIZE)


def _give(buf: mmap.mmap) -> None:
    with _free_lock:
        if len(_free) < _KEPT and len(buf) == _KEPT_SIZE:
            _free.append(buf)
            return
    with contextlib.suppress(BufferError):  # a view of it still exists: closed when collected
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


def _write_direct(fd: int, blocks: memoryview) -> int:
    """Write whole blocks from aligned memory to `fd` (direct transfers on); how many bytes were written
    before the end, a short write off a block boundary, or a refusal (a device or share that takes the
    flag but not the write: EINVAL; anything else, such as a full disk, the buffered write that follows
    raises too)."""
    done = 0
    try:
        while done < len(blocks):
            written = os.write(fd, blocks[done:])
            done += written
            if written % ALIGN:
                break
    except OSError:
        pass
    return done


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

    def write_aligned(self, view: memoryview) -> None:
        """The file's only write, from memory that starts on a block boundary (a `Held`'s): its whole
        blocks go directly from that memory, with no copy into a buffer, and the last partial block
        buffered (as everything after a refusal, as in `_write_blocks`). No buffer is taken: a worker's
        writer thread holding one would make a worker map a third."""
        assert self._buf is None and self._fill == 0, "only as the file's only write"
        done = _write_direct(self._fd, view[: len(view) - len(view) % ALIGN]) if self._direct else 0
        if self._direct:
            self._direct = False
            _set_direct(self._fd, False)
        _write_all(self._fd, view[done:])

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
        with memoryview(self._buf) as aligned:
            done = _write_direct(self._fd, aligned[:whole])
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


class Held:
    """A file's bytes in a block-aligned buffer of this module's (`read_held`): `view` is exactly the
    bytes read. Given back with `release` once nothing reads the bytes any more (the check, the hash and
    the write have ended): the buffer then holds the next file's bytes, so a view kept past that would
    show them. A file over `_KEPT_SIZE` gets a buffer of its own, unmapped at `release`."""

    def __init__(self, buf: mmap.mmap, size: int) -> None:
        self._buf: mmap.mmap | None = buf
        self.view = memoryview(buf)[:size]

    def release(self) -> None:
        """Give the buffer back (once; later calls do nothing)."""
        if self._buf is not None:
            self.view.release()
            buf, self._buf = self._buf, None
            _give(buf)


def write_new(path: str | os.PathLike[str], data: bytes | Held) -> None:
    """Create `path` (which must not exist) holding `data`, not flushed (see NewFile); a `Held` file is
    written from its own aligned memory (NewFile.write_aligned), bytes through the buffer."""
    with NewFile(path) as new:
        if isinstance(data, Held):
            new.write_aligned(data.view)
        else:
            new.write(data)


def read_held(fd: int, size: int, *, direct: bool = True) -> Held:
    """The first `size` bytes of the open file `fd` (as fstat gave its size; fewer if it shrank since),
    held in an aligned buffer (the caller releases it). `direct`: read past the page cache where the file
    system allows, else buffered from where the direct reads stopped; False: buffered (a user's file,
    which may well be in the cache already). Either way the kernel copies the bytes straight into the
    buffer, from which they are later written directly."""
    rounded = (size + ALIGN - 1) // ALIGN * ALIGN
    buf = _take(rounded)
    try:
        with memoryview(buf) as aligned:
            got = 0
            if direct and size >= ALIGN and _set_direct(fd, True):
                got = _read_direct(fd, aligned[:rounded])
                if got % ALIGN or got >= size:  # the end of the file, or all that was asked for
                    return Held(buf, min(got, size))
                _set_direct(fd, False)
            while got < size and (n := _read_into(fd, aligned[got:size])):
                got += n
        return Held(buf, got)
    except BaseException:
        _give(buf)
        raise


def _read_into(fd: int, into: memoryview) -> int:
    """One read into `into`; the bytes read (0 at the end of the file). Windows has no `readv`: there the
    bytes are read and copied (no direct reads there either)."""
    if hasattr(os, "readv"):
        return os.readv(fd, [into])
    data = os.read(fd, len(into))
    into[: len(data)] = data
    return len(data)


def _read_direct(fd: int, into: memoryview) -> int:
    """Read directly into `into` (aligned, a whole number of blocks) in pieces of at most `_CHUNK`; the
    bytes read, stopping at the end of the file (a short read) or where a device refuses direct reads
    (EINVAL: a whole number of blocks then, and the rest is read buffered)."""
    got = 0
    while got < len(into):
        try:
            n = os.readv(fd, [into[got : got + _CHUNK]])
        except OSError:
            return got
        got += n
        if n % ALIGN or n == 0:
            break
    return got
