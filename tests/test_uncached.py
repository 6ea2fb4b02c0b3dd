"""Files written and read past the page cache (bridge.store.uncached): the bytes on disk are exactly the
data, on every size around the block boundaries, whole or in pieces of any size, read back exactly, and on
a disk file system they do not occupy the page cache."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.store import uncached

SIZES = [0, 1, 4095, 4096, 4097, 3_000_123, 2 * (8 << 20) + 4096 + 7]  # the last: three aligned chunks
ON_LINUX = sys.platform.startswith("linux")


def resident_pages(path: Path) -> int:
    """How many of the file's pages are in the page cache: mincore(2) over a read-only mapping of it."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vector = ctypes.create_string_buffer(pages)
            assert libc.mincore(address, size, vector) == 0, os.strerror(ctypes.get_errno())
            return sum(byte & 1 for byte in vector.raw)
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)


def file_system(path: Path) -> str:
    return subprocess.run(
        ["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True
    ).stdout.strip()


def held(tmp_path: Path, data: bytes) -> uncached.Held:
    """`data` held as an import holds a file it read (`read_held`, buffered: a user's file)."""
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    fd = os.open(source, os.O_RDONLY)
    try:
        return uncached.read_held(fd, len(data), direct=False)
    finally:
        os.close(fd)
        source.unlink()


def written(tmp_path: Path, target: Path, data: bytes, kind: str) -> None:
    """`write_new` of `data` as bytes, or held as a file read for an import (written from its buffer)."""
    if kind == "bytes":
        uncached.write_new(target, data)
        return
    source = held(tmp_path, data)
    try:
        uncached.write_new(target, source)
    finally:
        source.release()


KINDS = ["bytes", "held"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", SIZES)
def test_the_file_holds_exactly_the_data(tmp_path: Path, size: int, kind: str) -> None:
    data = os.urandom(size)
    target = tmp_path / "f.bin"
    written(tmp_path, target, data, kind)
    assert target.read_bytes() == data


@pytest.mark.parametrize("kind", KINDS)
def test_an_existing_file_is_never_overwritten(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"kept")
    with pytest.raises(FileExistsError):
        written(tmp_path, target, os.urandom(10_000), kind)
    assert target.read_bytes() == b"kept"


@pytest.mark.skipif(not ON_LINUX, reason="O_DIRECT and mincore(2) are Linux's")
@pytest.mark.parametrize("kind", KINDS)
def test_whole_blocks_stay_out_of_the_page_cache_on_a_disk_file_system(tmp_path: Path, kind: str) -> None:
    """On a block device's file system (what a practice's image store is on) only the last partial block
    went through the page cache; a RAM file system holds every file in memory anyway."""
    size = 3_000_123
    direct = tmp_path / "direct.bin"
    written(tmp_path, direct, os.urandom(size), kind)
    buffered = tmp_path / "buffered.bin"
    buffered.write_bytes(os.urandom(size))
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    assert resident_pages(buffered) == pages  # the probe sees the cache
    if file_system(tmp_path) in ("tmpfs", "ramfs"):
        assert resident_pages(direct) == pages
    else:
        assert resident_pages(direct) <= 1


@pytest.mark.parametrize("kind", KINDS)
def test_without_direct_writes_the_file_is_written_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Windows, macOS, or a file system that refuses the flag: the same bytes, buffered."""
    monkeypatch.setattr(uncached, "_O_DIRECT", 0)
    data = os.urandom(3_000_123)
    written(tmp_path, tmp_path / "f.bin", data, kind)
    assert (tmp_path / "f.bin").read_bytes() == data


@pytest.mark.skipif(not ON_LINUX, reason="O_DIRECT is Linux's")
@pytest.mark.parametrize(("kind", "refused"), [("bytes", 2), ("held", 1), ("held", 2)])
def test_a_device_refusing_a_direct_write_gets_the_rest_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, refused: int
) -> None:
    """A share may take the flag and then refuse a write (EINVAL): the rest is written buffered. A held
    file goes in one direct write, refused at once or after a short write of whole blocks."""
    import fcntl

    real_write = os.write
    calls = {"direct": 0}

    def write(fd: int, data: bytes | memoryview) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & uncached._O_DIRECT:
            calls["direct"] += 1
            if calls["direct"] == refused:
                raise OSError(errno.EINVAL, "Invalid argument")
            if kind == "held":  # a short write: the first 8 MiB
                return real_write(fd, data[: 8 << 20])
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    data = os.urandom(3 * (8 << 20) + 123)
    written(tmp_path, tmp_path / "f.bin", data, kind)
    assert calls["direct"] == refused
    assert (tmp_path / "f.bin").read_bytes() == data


@pytest.mark.parametrize("kind", KINDS)
def test_a_failing_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """A full disk: the error is raised and the partial file removed."""
    data = os.urandom(10_000)
    source = held(tmp_path, data) if kind == "held" else data

    def full(fd: int, data: bytes | memoryview) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError) as caught:
        uncached.write_new(tmp_path / "f.bin", source)
    assert caught.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("piece", [1, 4095, 4096, 65_537, 4 << 20, 9 << 20])
def test_a_file_written_in_pieces_holds_exactly_the_data(tmp_path: Path, piece: int) -> None:
    """An upload arrives in chunks of any size; the partial block between them is carried over."""
    data = os.urandom(2 * (8 << 20) + 4096 + 7 if piece > 4096 else 300_001)
    target = tmp_path / "f.bin"
    with uncached.NewFile(target) as new:
        for start in range(0, len(data), piece):
            new.write(data[start : start + piece])
    assert target.read_bytes() == data


def test_a_file_abandoned_while_written_is_removed(tmp_path: Path) -> None:
    """An upload cut off or refused midway: no partial file remains."""
    target = tmp_path / "f.bin"
    with pytest.raises(RuntimeError), uncached.NewFile(target) as new:
        new.write(os.urandom(100_000))
        raise RuntimeError("the client went away")
    assert list(tmp_path.iterdir()) == []


def read_back(fd: int, size: int) -> bytes:
    """The bytes `read_held` holds (directly read where the file system allows), its buffer released."""
    held = uncached.read_held(fd, size)
    try:
        return bytes(held.view)
    finally:
        held.release()


@pytest.mark.parametrize("size", SIZES)
def test_a_file_is_read_back_exactly(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    target = tmp_path / "f.bin"
    uncached.write_new(target, data)
    fd = os.open(target, os.O_RDONLY)
    try:
        assert read_back(fd, size) == data
    finally:
        os.close(fd)


def test_a_read_stops_at_the_size_asked_for_and_at_the_end_of_the_file(tmp_path: Path) -> None:
    """`size` is what fstat said; the file may have grown or shrunk since."""
    data = os.urandom(3_000_123)
    target = tmp_path / "f.bin"
    target.write_bytes(data)
    for size in (2_000_000, 3_000_123, 4_000_000):
        fd = os.open(target, os.O_RDONLY)
        try:
            assert read_back(fd, size) == data[:size]
        finally:
            os.close(fd)


@pytest.mark.skipif(not ON_LINUX, reason="O_DIRECT is Linux's")
def test_a_device_refusing_a_direct_read_gets_the_rest_read_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A share that takes the flag and then refuses a read (EINVAL): the rest is read buffered."""
    import fcntl

    data = os.urandom(2 * (8 << 20) + 99)
    target = tmp_path / "f.bin"
    target.write_bytes(data)
    real_readv = os.readv
    calls = {"direct": 0}

    def readv(fd: int, buffers: list[memoryview]) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & uncached._O_DIRECT:
            calls["direct"] += 1
            if calls["direct"] == 2:
                raise OSError(errno.EINVAL, "Invalid argument")
        return real_readv(fd, buffers)

    monkeypatch.setattr(os, "readv", readv)
    fd = os.open(target, os.O_RDONLY)
    try:
        assert read_back(fd, len(data)) == data
    finally:
        os.close(fd)
    assert calls["direct"] == 2


@pytest.mark.parametrize("readv", [True, False])
def test_without_direct_reads_the_file_is_read_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, readv: bool
) -> None:
    """macOS, or a file system that refuses the flag; and Windows, which has no `readv` either (the
    bytes are read and copied into the buffer): the same bytes, held the same way."""
    monkeypatch.setattr(uncached, "_O_DIRECT", 0)
    if not readv:
        monkeypatch.delattr(os, "readv", raising=False)
    data = os.urandom(3_000_123)
    target = tmp_path / "f.bin"
    target.write_bytes(data)
    fd = os.open(target, os.O_RDONLY)
    try:
        assert read_back(fd, len(data)) == data
    finally:
        os.close(fd)


def hold(path: Path) -> uncached.Held:
    fd = os.open(path, os.O_RDONLY)
    try:
        return uncached.read_held(fd, path.stat().st_size)
    finally:
        os.close(fd)


def test_a_released_buffer_holds_the_next_file(tmp_path: Path) -> None:
    """Files of up to 16 MiB are held in kept buffers, mapped once per process and not once per file
    (whose pages a new mapping would fault in again); a larger file gets a buffer of its own, unmapped
    when it is released. Releasing twice does nothing more."""
    small, large = tmp_path / "small.bin", tmp_path / "large.bin"
    small.write_bytes(os.urandom(3_000_123))
    large.write_bytes(os.urandom((16 << 20) + 1))
    first = hold(small)
    buffer = first._buf
    first.release()
    first.release()
    second = hold(small)
    assert second._buf is buffer and bytes(second.view) == small.read_bytes()
    second.release()
    big = hold(large)
    own = big._buf
    assert own is not None and own is not buffer and bytes(big.view) == large.read_bytes()
    big.release()
    assert own.closed


def test_a_process_keeps_only_the_buffers_it_used_at_once_whatever_the_sizes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker holds two files at once (one written, the next read). Files growing from 3 to 16 MiB,
    two at a time, use the same two buffers throughout: none is mapped again for a larger file, and none
    is kept beyond those (a review found eight kept per worker, one per size seen, with kept buffers
    sized to their first file)."""
    monkeypatch.setattr(uncached, "_free", [])  # a process that has held nothing yet
    used: set[int] = set()
    for mib in (3, 9, 10, 12, 15, 16):
        files = [tmp_path / f"{mib}-{n}.bin" for n in range(2)]
        for path in files:
            path.write_bytes(os.urandom((mib << 20) - 4096 - 7))
        held = [hold(path) for path in files]
        for path, one in zip(files, held, strict=True):
            assert bytes(one.view) == path.read_bytes()
            used.add(id(one._buf))
        for one in held:
            one.release()
        for path in files:
            path.unlink()
    assert len(used) == 2 and len(uncached._free) == 2
