"""multipart/form-data (RFC 7578; the framing of RFC 2046, section 5.1.1) read as a stream of parts: the
reader of every multipart upload of the REST API (DICOM imports of many large files, acquisitions).

Why not aiohttp's own reader: to find the boundary it joins the previous and the current chunk and slices
the result again, so each byte of a part is copied six times or more; for a DICOM import that was a
quarter of the daemon's CPU per file (docs/dicom.md, "Performance"). Here the body's chunks are searched
where they lie and a part's data is handed out as views of them: the one copy left is the write into the
file. The body is untrusted: a part's header block is limited (`MAX_HEAD`), a nested multipart body and a
transfer encoding other than the identity are refused, a body that ends before its closing boundary is
an error, never a silently shortened file, and a reader given `max_bytes` stops a body that grows beyond.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import StreamReader
from aiohttp.multipart import content_disposition_filename, parse_content_disposition

MAX_HEAD = 16 * 1024  # bytes of one part's header lines
LARGE_READ = 4 << 20  # bytes one socket read of an upload may take (asyncio's own: 256 KiB)
MAX_BOUNDARY = 70  # RFC 2046
_IDENTITY = ("", "binary", "8bit", "7bit")


class MultipartError(ValueError):
    """The body is not well-formed multipart/form-data (answered 400)."""


class BodyTooLarge(ValueError):
    """The body went beyond the reader's `max_bytes` while arriving (answered 413)."""


@dataclass(frozen=True)
class PartHead:
    """What a part's headers say: its form field name, the client's file name, its media type."""

    name: str | None
    filename: str | None
    content_type: str


def read_in_large_pieces(transport: asyncio.BaseTransport | None) -> None:
    """Let the connection of an upload take up to LARGE_READ bytes per socket read. asyncio reads a
    socket 256 KiB at a time, and each piece then passes through aiohttp's parser and stream, a wake-up of
    the reader and the pause and resume of the socket: 12 rounds for a 3 MB X-ray. With 4 MiB reads a
    REST import of 100 such files took 0.8-1.25 ms less CPU per file and was 4-11 % faster (medians of two
    sets of interleaved runs, docs/dicom.md, "Performance"); 16 MiB reads were slower (each read's buffer
    is then mapped afresh). A read returns what the socket holds, so small requests cost no more. Where
    the transport does not read so (TLS, whose own transport reads below it; Windows' proactor), nothing
    changes. The setting stays with the connection for its later requests."""
    if transport is not None and isinstance(getattr(transport, "max_size", None), int):
        transport.max_size = LARGE_READ  # type: ignore[attr-defined]


async def next_chunk(content: StreamReader) -> bytes:
    """The next piece of a request body as it arrived; b"" at its end. aiohttp's `readany` joins every
    piece waiting in the buffer into one (a copy of each byte); `readchunk` hands them out one by one."""
    while True:
        data, end_of_http_chunk = await content.readchunk()
        # (b"", True) marks the end of a chunk of a chunked body, and is all an empty body ever answers
        if data or not end_of_http_chunk or content.at_eof():
            return data


def boundary_of(content_type_params: Mapping[str, str]) -> str:
    """The boundary parameter of a multipart Content-Type, checked (RFC 2046: 1 to 70 characters)."""
    boundary = content_type_params.get("boundary", "")
    if not 0 < len(boundary) <= MAX_BOUNDARY or not boundary.isascii():
        raise MultipartError("the multipart Content-Type has no usable boundary parameter")
    return boundary


class FormReader:
    """The parts of one multipart body, in order: `next_part` gives a part's head (None after the last),
    `read` its data in pieces until b"". A part not read to its end is skipped by `next_part`."""

    def __init__(self, content: StreamReader, boundary: str, max_bytes: int | None = None) -> None:
        self._content = content
        self._max_bytes = max_bytes
        self._received = 0
        self._delimiter = b"\r\n--" + boundary.encode("ascii")
        # The first delimiter may start the body without a line break before it: one is supplied, so the
        # preamble (usually empty) is read as the data of a part nobody asked for.
        self._buf = b"\r\n"
        self._pos = 0
        self._in_part = True
        self._closed = False

    async def next_part(self) -> PartHead | None:
        """The next part's head, its data ready for `read`; None when the closing delimiter was read."""
        while self._in_part:
            await self.read()
        if self._closed:
            return None
        while len(self._buf) - self._pos < 2:
            await self._more("inside a boundary line")
        if self._buf[self._pos : self._pos + 2] == b"--":
            self._closed = True  # the epilogue after the closing delimiter is ignored (RFC 2046)
            return None
        end = await self._find(b"\r\n", "inside a boundary line")
        if self._buf[self._pos : end].strip(b" \t"):
            raise MultipartError("a boundary line carries text after the boundary")
        self._pos = end + 2
        if await self._ensure(2) == b"\r\n":
            lines: list[bytes] = []
            self._pos += 2
        else:
            end = await self._find(b"\r\n\r\n", "inside a part's headers")
            lines = self._buf[self._pos : end].split(b"\r\n")
            self._pos = end + 4
        self._in_part = True
        return _head(lines)

    async def read(self) -> memoryview:
        """The next piece of the current part's data (a view of the body as received); empty at its end."""
        if not self._in_part:
            return memoryview(b"")
        while True:
            found = self._buf.find(self._delimiter, self._pos)
            if found >= 0:
                piece = memoryview(self._buf)[self._pos : found]
                self._pos = found + len(self._delimiter)
                self._in_part = False
                return piece
            end = len(self._buf) - self._partial_delimiter()
            if end > self._pos:
                piece = memoryview(self._buf)[self._pos : end]
                self._pos = end
                return piece
            await self._more("inside a part, before its closing boundary")

    async def read_all(self) -> bytes:
        """The rest of the current part's data as one bytes object (a small part, held in memory)."""
        pieces = []
        while piece := await self.read():
            pieces.append(piece)
        return b"".join(pieces)

    def _partial_delimiter(self) -> int:
        """How many bytes at the end of the buffer may begin a delimiter: kept until more data arrives.
        Binary data seldom ends so, so the next chunk is seldom copied to join them."""
        size = len(self._buf)
        at = self._buf.find(b"\r", max(self._pos, size - len(self._delimiter) + 1))
        while at >= 0:
            if self._delimiter.startswith(self._buf[at:]):
                return size - at
            at = self._buf.find(b"\r", at + 1)
        return 0

    async def _more(self, where: str) -> None:
        """Append the next chunk of the body to what is not consumed yet."""
        chunk = await next_chunk(self._content)
        if not chunk:
            raise MultipartError(f"the body ends {where}")
        self._received += len(chunk)
        if self._max_bytes is not None and self._received > self._max_bytes:
            raise BodyTooLarge(f"request body too large (limit {self._max_bytes} bytes)")
        rest = self._buf[self._pos :] if self._pos < len(self._buf) else b""
        self._buf = rest + chunk if rest else chunk
        self._pos = 0

    async def _find(self, marker: bytes, where: str) -> int:
        """The index of `marker` at or after the read position, reading on for it within `MAX_HEAD`."""
        while (found := self._buf.find(marker, self._pos)) < 0:
            if len(self._buf) - self._pos > MAX_HEAD:
                raise MultipartError(f"a part's headers are longer than {MAX_HEAD} bytes")
            await self._more(where)
        if found - self._pos > MAX_HEAD:
            raise MultipartError(f"a part's headers are longer than {MAX_HEAD} bytes")
        return found

    async def _ensure(self, count: int) -> bytes:
        """The next `count` bytes, not consumed."""
        while len(self._buf) - self._pos < count:
            await self._more("inside a part's headers")
        return self._buf[self._pos : self._pos + count]


def _head(lines: list[bytes]) -> PartHead:
    """A part's head from its header lines (folded lines joined; names case-insensitive)."""
    headers: dict[str, str] = {}
    last = ""
    for raw in lines:
        line = raw.decode("utf-8", "replace")  # browsers send a file name's UTF-8 bytes as they are
        if line[:1] in (" ", "\t") and last:
            headers[last] += " " + line.strip()
            continue
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise MultipartError(f"a part's header line is malformed: {line[:80]!r}")
        last = name.strip().lower()
        headers[last] = value.strip()
    content_type = headers.get("content-type", "text/plain")
    if content_type.lower().startswith("multipart/"):
        raise MultipartError("nested multipart bodies are not accepted")
    encoding = headers.get("content-transfer-encoding", "").lower()
    if encoding not in _IDENTITY:
        raise MultipartError(
            f"Content-Transfer-Encoding {encoding} is not accepted: send the bytes as they are"
        )
    _kind, params = parse_content_disposition(headers.get("content-disposition"))
    return PartHead(params.get("name"), content_disposition_filename(params, "filename"), content_type)
