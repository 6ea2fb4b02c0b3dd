"""The multipart/form-data reader of bulk uploads (bridge.web.multipart) over aiohttp's real StreamReader,
fed in chunks of every size, so that a boundary, a CRLF or a header block split anywhere is still found;
and malformed bodies refused with a reason."""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path
from typing import Any

import pytest
from aiohttp import StreamReader
from aiohttp.base_protocol import BaseProtocol

from bridge.web.multipart import (
    LARGE_READ,
    MAX_HEAD,
    BodyTooLarge,
    FormReader,
    MultipartError,
    PartHead,
    boundary_of,
    read_in_large_pieces,
)

BOUNDARY = "b0und4ry"
# Data that looks like a delimiter without being one: a CRLF and dashes before most of the boundary, the
# boundary after one dash, after a space, and not at the start of a line; and data that ends in the first
# bytes of a delimiter, just before the real one.
TRICKY = (
    b"\r\n--b0und4r\r\n-b0und4ry\r\r\n--b0und4\r\n-- b0und4ry x--b0und4ry" + os.urandom(5000) + b"\r\n--b0und"
)


def body(parts: list[tuple[str, bytes]], preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    out = [preamble + (b"\r\n" if preamble else b"")]
    for head, data in parts:
        out.append(f"--{BOUNDARY}\r\n{head}\r\n\r\n".encode() + data + b"\r\n")
    out.append(f"--{BOUNDARY}--\r\n".encode() + epilogue)
    return b"".join(out)


def file_head(filename: str) -> str:
    return f'Content-Disposition: form-data; name="file"; filename="{filename}"'


async def read_all(raw: bytes, chunk: int) -> list[tuple[PartHead, bytes]]:
    """Every part of `raw` fed to a real StreamReader `chunk` bytes at a time."""
    stream = StreamReader(BaseProtocol(asyncio.get_running_loop()), 2**16, loop=asyncio.get_running_loop())
    for start in range(0, len(raw), chunk):
        stream.feed_data(raw[start : start + chunk])
    stream.feed_eof()
    form = FormReader(stream, BOUNDARY)
    parts = []
    while (head := await form.next_part()) is not None:
        pieces = []
        while piece := await form.read():
            pieces.append(bytes(piece))
        parts.append((head, b"".join(pieces)))
    return parts


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 13, 64, 4099, 1 << 20])
async def test_parts_come_out_exactly_however_the_body_is_cut(chunk: int) -> None:
    first = os.urandom(20_000)
    raw = body(
        [
            (file_head("a.dcm"), first),
            ('Content-Disposition: form-data; name="note"', "Müller, Anna".encode()),
            (file_head("tricky.dcm") + "\r\nContent-Type: application/dicom", TRICKY),
            (file_head("empty.dcm"), b""),
        ],
        preamble=b"This is the preamble; --b0und4ry is only a boundary at the start of a line.",
        epilogue=b"an epilogue, ignored",
    )
    parts = await read_all(raw, chunk)
    assert [(h.name, h.filename, h.content_type, d) for h, d in parts] == [
        ("file", "a.dcm", "text/plain", first),
        ("note", None, "text/plain", "Müller, Anna".encode()),
        ("file", "tricky.dcm", "application/dicom", TRICKY),
        ("file", "empty.dcm", "text/plain", b""),
    ]


async def test_a_part_not_read_is_skipped_and_headers_may_be_folded_padded_or_absent() -> None:
    raw = (
        f"--{BOUNDARY}  \t\r\n".encode()  # transport padding after the boundary (RFC 2046)
        + b'Content-Disposition: form-data;\r\n name="skipped"\r\n\r\n'
        + os.urandom(10_000)
        + f"\r\n--{BOUNDARY}\r\n\r\nno headers at all\r\n".encode()
        + f"--{BOUNDARY}\r\n".encode()
        + b"Content-Disposition: form-data; name=\"file\"; filename*=UTF-8''%C3%9Cbergabe.dcm\r\n\r\n"
        + b"x\r\n"
        + f"--{BOUNDARY}--".encode()
    )
    stream = StreamReader(BaseProtocol(asyncio.get_running_loop()), 2**16, loop=asyncio.get_running_loop())
    stream.feed_data(raw)
    stream.feed_eof()
    form = FormReader(stream, BOUNDARY)
    skipped = await form.next_part()
    assert skipped is not None and skipped.name == "skipped"
    bare = await form.next_part()
    assert bare == PartHead(None, None, "text/plain")
    assert bytes(await form.read()) == b"no headers at all"
    named = await form.next_part()
    assert named is not None and named.filename == "Übergabe.dcm"
    assert bytes(await form.read()) == b"x" and bytes(await form.read()) == b""
    assert await form.next_part() is None
    assert await form.next_part() is None


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (
            f"--{BOUNDARY}\r\n{file_head('a.dcm')}\r\n\r\n".encode() + os.urandom(3000),
            "the body ends inside a part, before its closing boundary",
        ),
        (f"--{BOUNDARY}\r\n{file_head('a.dcm')}".encode(), "the body ends inside a part's headers"),
        (b"no boundary anywhere", "the body ends inside a part, before its closing boundary"),
        (
            f"--{BOUNDARY}\r\nX-Long: {'y' * MAX_HEAD}\r\n\r\n".encode(),
            f"a part's headers are longer than {MAX_HEAD} bytes",
        ),
        (
            f"--{BOUNDARY}\r\nContent-Type: multipart/mixed; boundary=inner\r\n\r\n--inner--\r\n".encode(),
            "nested multipart bodies are not accepted",
        ),
        (
            f"--{BOUNDARY}\r\n{file_head('a.dcm')}\r\nContent-Transfer-Encoding: base64\r\n\r\nAAAA".encode(),
            "Content-Transfer-Encoding base64 is not accepted: send the bytes as they are",
        ),
        (
            f"--{BOUNDARY}\r\nno colon here\r\n\r\n".encode(),
            "a part's header line is malformed: 'no colon here'",
        ),
        (f"--{BOUNDARY}junk\r\n\r\n".encode(), "a boundary line carries text after the boundary"),
    ],
)
async def test_malformed_bodies_are_refused_with_the_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(MultipartError) as caught:
        await read_all(raw, 1000)
    assert str(caught.value) == reason


@pytest.mark.parametrize("params", [{}, {"boundary": ""}, {"boundary": "x" * 71}, {"boundary": "grenzé"}])
def test_a_content_type_without_a_usable_boundary_is_refused(params: dict[str, str]) -> None:
    with pytest.raises(MultipartError, match="no usable boundary"):
        boundary_of(params)


def fed(raw: bytes, chunk: int) -> StreamReader:
    stream = StreamReader(BaseProtocol(asyncio.get_running_loop()), 2**16, loop=asyncio.get_running_loop())
    for start in range(0, len(raw), chunk):
        stream.feed_data(raw[start : start + chunk])
    stream.feed_eof()
    return stream


async def test_a_small_part_is_read_whole_and_a_body_beyond_max_bytes_is_stopped() -> None:
    raw = body(
        [('Content-Disposition: form-data; name="note"', b"a, b"), (file_head("x.png"), bytes(50_000))]
    )
    form = FormReader(fed(raw, 4096), BOUNDARY, max_bytes=len(raw))
    assert await form.next_part() is not None and await form.read_all() == b"a, b"
    assert await form.next_part() is not None and await form.read_all() == bytes(50_000)
    assert await form.next_part() is None
    limited = FormReader(fed(raw, 4096), BOUNDARY, max_bytes=20_000)
    assert await limited.next_part() is not None  # the first chunks are within the limit
    with pytest.raises(BodyTooLarge, match="limit 20000 bytes"):
        while await limited.next_part() is not None:
            await limited.read_all()


async def _upload_over(tls: ssl.SSLContext | None, client_tls: ssl.SSLContext | None) -> tuple[Any, bytes]:
    """8 MB sent to a real loopback server whose connection read_in_large_pieces was given: the server's
    transport's read size afterwards, and the bytes it got."""
    body = os.urandom(8 << 20)
    done: asyncio.Future[tuple[Any, bytes]] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        read_in_large_pieces(writer.transport)
        got = await reader.readexactly(len(body))
        done.set_result((getattr(writer.transport, "max_size", None), got))
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    async with server:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_tls)
        writer.write(body)
        await writer.drain()
        async with asyncio.timeout(30):
            size, got = await done
        writer.close()
    assert got == body
    return size, got


async def test_an_upload_connection_reads_in_large_pieces_and_gets_every_byte() -> None:
    size, _got = await _upload_over(None, None)
    assert size == LARGE_READ


async def test_an_upload_over_tls_reads_as_before_and_gets_every_byte(tmp_path: Path) -> None:
    """TLS reads below the transport a handler sees: that one is left as it is."""
    from bridge.install import write_self_signed
    from bridge.tls import server_context

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    write_self_signed(cert, key)
    client = ssl.create_default_context(cafile=cert)
    size, _got = await _upload_over(server_context(("cert", cert), ("key", key)), client)
    assert size is None
